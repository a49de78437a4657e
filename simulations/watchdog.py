"""Stops what a `fedrex simulate` started when that process dies without cleaning up (kill -9).

The managed SuperLink and the simulation processes it starts live in sessions of their own (Flower
detaches them), so a signal to the `fedrex simulate` process group does not reach them: they would
finish the run unobserved and keep the ports the next simulation joins. `fedrex simulate` starts
this watchdog in a session of its own too; it waits for its parent to die, then stops the same
process groups a normal exit stops (``simulations.localhost.stop_groups``). A normal exit stops
the watchdog first.

    python -m simulations.watchdog PARENT_PID FLWR_HOME PORT
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from simulations.localhost import process_groups, stop_groups


def alive(pid: int) -> bool:
    """``pid`` runs (a zombie, killed and waiting for its parent to reap it, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def simulation_groups(home: str, port: str) -> set[int]:
    """The managed SuperLink (its command line names the run's FLWR_HOME) and the processes it
    started (they name its address)."""
    return process_groups("flower-superlink", home) | process_groups("flwr-", f"127.0.0.1:{port}")


def main(argv: list[str]) -> int:
    parent, home, port = int(argv[0]), argv[1], argv[2]
    while alive(parent):
        time.sleep(0.1)
    stop_groups(simulation_groups(home, port))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
