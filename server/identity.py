"""Which node speaks for which user, on a real deployment.

A device names its own user (``client-id`` in its node config), so two devices, or one malicious
one, could claim the same user and mix their rows and personal state under one name. The server
therefore binds each user to the node that answered for it (with SuperNode authentication a
node id belongs to one registered public key, ``flwr supernode register``), keeps the binding in
run.json for the whole run, resumes included, and settles every discovery's claims by it:

- claims conflict when they name the same user or the same partition (a device may set its own
  partition-id);
- one claimant, unbound or bound to it: it takes part (and is bound);
- one claimant of a user bound to another node, which is not connected now or names another
  user now: it takes part and is bound instead, recorded (a device restarted without
  authentication gets a new node id; a node speaks for one user);
- several claimants: the one bound to its user keeps it; if none is, nobody can tell which is
  genuine, and none of them takes part. Every claimant turned away is recorded, with why.

Simulated nodes read partitions of one dataset, so two of them on one partition are a
misconfiguration of the run, not an attack: that stays an error.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.errors import FedrexError


@dataclass(frozen=True)
class Claim:
    node: int
    partition_id: int
    client_id: str
    simulated: bool


def settle_claims(claims: list[Claim], bound: dict[str, int]) -> tuple[list[Claim], list[tuple[Claim, str]], dict[str, int]]:
    """(the claims that take part, what to record about the others and the rebound ones, the
    binding to keep); ``bound``: user (client id) -> node id, as run.json kept it.

    Claims conflict when they name the same user or the same partition (a device may set its own
    partition-id), so they are settled in groups linked by either. A node speaks for one user: a
    bound node that now names another user releases the first, which another node may then take."""
    claims = sorted(claims, key=lambda c: c.node)
    groups = _linked(claims)
    claimed_by = {c.node: c.client_id for c in claims}
    accepted, notes, binding = [], [], {}
    for group in sorted(groups, key=lambda g: min(c.partition_id for c in g)):
        if len(group) > 1 and all(c.simulated for c in group):
            names = ", ".join(repr(c.client_id) for c in group)
            pids = sorted({c.partition_id for c in group})
            raise FedrexError(f"nodes {names} all serve partition id {pids[0]}: give each simulated node its own "
                              "partition-id")
        owners = [c for c in group if bound.get(c.client_id) == c.node]
        if len(group) == 1:
            claim = group[0]
            previous = bound.get(claim.client_id)
            if previous is not None and previous != claim.node:
                # the bound node is gone, or now speaks for another user: it released this one
                where = "is not connected" if previous not in claimed_by else f"now names {claimed_by[previous]!r}"
                notes.append((claim, f"now speaks for user {claim.client_id!r} (bound to node {previous}, which "
                                     f"{where}): rebound to this node"))
            accepted.append(claim)
        elif len(owners) == 1:
            accepted.append(owners[0])
            for claim in group:
                if claim is not owners[0]:
                    notes.append((claim, f"claims user {claim.client_id!r} (partition {claim.partition_id}), which "
                                         f"conflicts with node {owners[0].node}, bound to user "
                                         f"{owners[0].client_id!r}: refused"))
        else:
            names = ", ".join(f"{c.client_id!r} (partition {c.partition_id}) on node {c.node}" for c in group)
            for claim in group:
                notes.append((claim, f"several nodes claim one user or partition ({names}) and "
                                     f"{'more than one' if owners else 'none'} is bound to it: none of them takes "
                                     "part; give each device its own client-id"))
    for user, node in bound.items():  # kept for users whose node is away; released by a node that renamed itself
        if node not in claimed_by or claimed_by[node] == user:
            binding[user] = node
    for claim in accepted:
        if not claim.simulated:
            binding = {u: n for u, n in binding.items() if n != claim.node and u != claim.client_id}
            binding[claim.client_id] = claim.node
    return accepted, notes, binding


def _linked(claims: list[Claim]) -> list[list[Claim]]:
    """The claims in groups linked by a shared user or partition (union-find: linear in the claims,
    which a pool's discovery makes 100,000), each group in the claims' order."""
    parent: dict[tuple, tuple] = {}

    def root(key: tuple) -> tuple:
        parent.setdefault(key, key)
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    for claim in claims:
        parent[root(("user", claim.client_id))] = root(("partition", claim.partition_id))
    groups: dict[tuple, list[Claim]] = {}
    for claim in claims:
        groups.setdefault(root(("user", claim.client_id)), []).append(claim)
    return list(groups.values())
