"""Flower processes on this machine: a free port, whether a port answers, waiting for a log line.
Used by `fedrex simulate` (its managed SuperLink), the deployment tests and the device benchmark."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports nobody listens on now (held open together while they are chosen,
    so the kernel cannot hand out one twice)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_open(port: int | str) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex(("127.0.0.1", int(port))) == 0


def wait_for(log: Path, text: str, timeout: float = 120.0) -> None:
    """Until ``log`` holds ``text``; an AssertionError with the log's tail after ``timeout`` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.exists() and text in log.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise AssertionError(f"{log.name} never said {text!r}:\n{log.read_text(errors='replace')[-3000:]}")


def matching_pids(*words: str) -> set[int]:
    """The processes whose command line holds every word in ``words``, never this one."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                line = handle.read().decode(errors="replace")
        except OSError:
            continue
        if all(word in line for word in words):
            found.add(int(entry))
    return found


def flag_value(pid: int, flag: str) -> str | None:
    """The word after ``flag`` on a process's command line (a SuperLink's ``--port``); None when it
    has no such flag or has ended."""
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]  # each word ends in a NUL
    except OSError:
        return None
    return words[words.index(flag.encode()) + 1].decode() if flag.encode() in words[:-1] else None


def process_groups(*words: str) -> set[int]:
    """Process groups of the processes ``matching_pids(*words)`` (never the caller's own group)."""
    groups = set()
    for pid in matching_pids(*words):
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            continue
    return groups - {os.getpgid(0)}


def stop_groups(groups: set[int], grace: float = 10.0) -> None:
    """SIGTERM every process of ``groups`` (a detached SuperLink and what it started: the
    ServerApp and simulation processes, Ray's), SIGKILL what is left after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while time.time() < deadline and any(group_alive(g) for g in groups):
            time.sleep(0.2)


def group_members(groups: set[int]) -> set[int]:
    """The running processes of ``groups`` (zombies, waiting for a parent to reap them, do not run)."""
    members = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) in groups and fields[0] != "Z":
            members.add(int(stat.parent.name))
    return members


def group_alive(group: int) -> bool:
    """A process of ``group`` still runs."""
    return bool(group_members({group}))


def parent_pids() -> dict[int, int]:
    """Every running process's parent: pid -> parent pid."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    return parents


def tree_pids(*roots: int) -> set[int]:
    """``roots`` and all their descendants, each once (Ray's raylet, GCS and workers too)."""
    parents = parent_pids()
    tree, frontier = set(roots), list(roots)
    while frontier:
        pid = frontier.pop()
        children = [c for c, p in parents.items() if p == pid and c not in tree]
        tree.update(children)
        frontier.extend(children)
    return tree


def pss_mb(pids) -> float:
    """Sum of the processes' PSS (shared pages counted once between them): pass a set, so that a
    process reached twice (a SuperLink that is also the command's descendant) counts once."""
    total_kb = 0
    for pid in set(pids):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Pss:"):
                        total_kb += int(line.split()[1])
                        break
        except OSError:
            continue
    return total_kb / 1024


def tree_pss_mb(root_pid: int) -> float:
    """PSS of ``root_pid`` and all its descendants."""
    return pss_mb(tree_pids(root_pid))
