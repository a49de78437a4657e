"""Stops what a `fedrex simulate` started when that process dies without cleaning up (kill -9).

The managed SuperLink and the simulation processes it starts live in sessions of their own (Flower
detaches them), so a signal to the `fedrex simulate` process group does not reach them: they would
finish the run unobserved and keep the ports the next simulation joins. `fedrex simulate` starts
this watchdog in a session of its own too; it waits for its parent to die, then stops the same
process groups a normal exit stops (``stop_simulation``) and removes the staged copy of the app
(``STAGED_APP_PREFIX`` folders in FLWR_HOME). A normal exit stops the watchdog first.

    python -m simulations.watchdog PARENT_PID FLWR_HOME PORT
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from simulations.app_bundle import STAGED_APP_PREFIX
from simulations.localhost import group_alive, process_groups, stop_groups


def alive(pid: int) -> bool:
    """``pid`` runs (a zombie, killed and waiting for its parent to reap it, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def simulation_groups(home: str, port: str) -> set[int]:
    """The managed SuperLink (its command line names the run's FLWR_HOME and its port) and the
    processes it started (the SuperExec, the simulation and ServerApp processes: Flower's own
    executables, each naming its address as a whole argument). Ray's processes share the simulation
    process's group without naming either. The port tells this run's SuperLink from the next one
    in the same FLWR_HOME (a resume gets new ports); nothing else that mentions the address (a
    user's `curl 127.0.0.1:PORT`) is the run's."""
    address = f"\x00127.0.0.1:{port}\x00"  # a whole argument: port 5182 is not 51825
    return (process_groups("flower-superlink", home, f"--port\x00{port}\x00")
            | process_groups("flwr-", address) | process_groups("flower-superexec", address))


def stop_simulation(home: str, port: str, looks: int = 5) -> None:
    """Stop ``simulation_groups`` until a look finds none (at most ``looks`` looks): a process
    started while the first look was taken (the SuperLink launching the simulation process, a
    process group whose only matching member died a moment before) is found by the next."""
    for _ in range(looks):
        groups = simulation_groups(home, port)
        if not groups:
            return
        stop_groups(groups)


def main(argv: list[str]) -> int:
    parent, home, port = int(argv[0]), argv[1], argv[2]
    seen: set[int] = set()
    looked = 0.0
    while alive(parent):
        if time.time() - looked > 1.0:
            # remembered: a kill -9 of the simulation process too leaves Ray's processes in its group
            # with nothing there to name it. Only groups with a live member are kept: the kernel never
            # hands out a group id still in use, so a kept id is still the run's group
            seen = {group for group in seen if group_alive(group)} | simulation_groups(home, port)
            looked = time.time()
        time.sleep(0.1)
    stop_groups({group for group in seen if group_alive(group)})
    stop_simulation(home, port)
    for staged in Path(home).glob(f"{STAGED_APP_PREFIX}*"):
        shutil.rmtree(staged, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
