"""Which node speaks for which user, on a real deployment.

A device names its own user (``client-id`` in its node config), so two devices, or one malicious
one, could claim the same user and mix their rows and personal state under one name. The server
therefore binds each user to the node that answered for it (with SuperNode authentication a
node id belongs to one registered public key, ``flwr supernode register``), keeps the binding in
run.json for the whole run, resumes included, and settles every discovery's claims by it:

- one claimant, unbound or bound to it: it takes part (and is bound);
- one claimant, bound to another node that is not connected now: it takes part and is bound
  instead, recorded (a device restarted without authentication gets a new node id);
- several claimants: the node the user is bound to keeps it; if none is, nobody can tell which
  is genuine, and none of them takes part. Every claimant turned away is recorded, with why.

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
    binding to keep); ``bound``: user (client id) -> node id, as run.json kept it."""
    by_partition: dict[int, list[Claim]] = {}
    for claim in sorted(claims, key=lambda c: c.node):
        by_partition.setdefault(claim.partition_id, []).append(claim)
    connected = {c.node for c in claims}
    accepted, notes, binding = [], [], dict(bound)
    for pid, group in sorted(by_partition.items()):
        if len(group) > 1 and all(c.simulated for c in group):
            names = ", ".join(repr(c.client_id) for c in group)
            raise FedrexError(f"nodes {names} all serve partition id {pid}: give each simulated node its own partition-id")
        owner = [c for c in group if bound.get(c.client_id) == c.node]
        if len(group) == 1 and not owner:
            claim = group[0]
            previous = bound.get(claim.client_id)
            if previous is not None and previous in connected:
                notes.append((claim, f"claims user {claim.client_id!r}, which this run bound to node {previous}: refused"))
                continue
            accepted.append(claim)
            if previous is not None:
                notes.append((claim, f"now speaks for user {claim.client_id!r} (bound to node {previous}, which is "
                                       "not connected): rebound to this node"))
        elif owner:
            accepted.append(owner[0])
            for claim in group:
                if claim is not owner[0]:
                    notes.append((claim, f"claims user {claim.client_id!r} (partition {pid}), which this run bound "
                                           f"to node {owner[0].node}: refused"))
        else:
            names = ", ".join(f"{c.client_id!r} on node {c.node}" for c in group)
            for claim in group:
                notes.append((claim, f"several nodes claim partition {pid} ({names}) and none is bound to it: none of "
                                       "them takes part; give each device its own client-id"))
    for claim in accepted:
        if not claim.simulated:
            binding[claim.client_id] = claim.node
    return accepted, notes, binding
