"""Users served by a pool of simulated nodes (``simulation-nodes`` > 0).

Flower's simulation engine registers every simulated SuperNode, and its SuperLink polls each of them
every 0.1 s, so a node per user costs start-up, discovery and CPU in proportion to the users. With a
pool, a few nodes serve every user: each user is a *virtual node* here (``virtual_node(pid)``), the
strategy, the recorder and the fleet rules work with those exactly as with real nodes, and
``UserGrid`` sits between them and Flower's grid: a message to a user goes to a pool node and names
its user (``models.protocol.USERS``), and the reply comes back as the user's own. A user's personal
state lives in the run folder (``client/state.py``), so any pool node can serve any user.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, RecordDict

from models.protocol import CONFIG, USERS
from server.strategy import ProgressGrid, users_record

VIRTUAL_BASE = 1 << 62  # far from Flower's node ids (random, below 2**63): no clash to expect, one checked


def virtual_node(partition_id: int) -> int:
    return VIRTUAL_BASE + int(partition_id)


def query_messages(pool: list[int], num_users: int, config: ConfigRecord, query_type: str) -> list[Message]:
    """The discovery of every user through the pool: 4 messages per pool node, each naming a
    contiguous share of the users."""
    chunks = max(1, min(num_users, 4 * len(pool)))
    bounds = [round(i * num_users / chunks) for i in range(chunks + 1)]
    return [Message(RecordDict({CONFIG: config, USERS: users_record(list(range(bounds[i], bounds[i + 1])))}),
                    dst_node_id=pool[i % len(pool)], message_type=query_type)
            for i in range(chunks)]


class UserGrid:
    """Flower's grid as the strategy sees it in a pooled simulation: every user is a node."""

    def __init__(self, grid, pool: list[int], partitions: list[int]):
        self._grid, self._pool = grid, sorted(pool)
        self._users = [virtual_node(p) for p in sorted(partitions)]
        if set(self._users) & set(self._pool):
            raise RuntimeError("a pool node's id is also a user's virtual id")
        self._sent_to: dict[str, int] = {}  # pushed message id -> the virtual node it was for
        self._turn = 0

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def get_node_ids(self):
        return list(self._users)

    def push_messages(self, messages):
        # a new batch: replies to an earlier one that timed out are no longer awaited (Flower's
        # pull returns only the ids asked for), so their mapping goes
        self._sent_to.clear()
        pushed, virtual = [], []
        for msg in messages:
            user = msg.metadata.dst_node_id
            if USERS not in msg.content.config_records:  # a message for one user names it
                msg.content = RecordDict({**dict(msg.content.items()), USERS: users_record([user - VIRTUAL_BASE])})
            msg.metadata.dst_node_id = self._pool[self._turn % len(self._pool)]  # round robin over the pool
            self._turn += 1
            pushed.append(msg)
            virtual.append(user)
        ids = list(self._grid.push_messages(pushed))
        for message_id, user in zip(ids, virtual, strict=True):
            if message_id:
                self._sent_to[message_id] = user
        return ids

    def send_and_receive(self, messages, *, timeout=None):
        """Through this grid's push and pull (the wrapped grid's own would skip the mapping)."""
        return ProgressGrid(self, show=False).send_and_receive(messages, timeout=timeout)

    def pull_messages(self, message_ids):
        replies = list(self._grid.pull_messages(message_ids))
        for reply in replies:
            user = self._sent_to.pop(reply.metadata.reply_to_message_id, None)
            if user is not None:  # the reply speaks for the user, as its own node would
                # Metadata keeps its fields in __dict__ and has no setter for the sender; Flower's
                # own grids set the message id the same way
                reply.metadata.__dict__["_src_node_id"] = user
        return replies
