"""Files written whole or not at all, without torch (``analysis`` and devices without torch use it):
a temporary file beside the target, renamed into place."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from models.errors import FedrexError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place: a crash
    leaves the old file or the new one. A folder that cannot be written (not a folder, read-only,
    disk full) is one clear error, and the partial temporary file is removed."""
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; artifacts are meant to be shared
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise FedrexError(f"cannot write {path}: {err.strerror or err} (is the folder writable, the disk full?); "
                          "nothing was written there") from None


def atomic_write_json(path: Path, payload) -> None:
    atomic_write_bytes(Path(path), json.dumps(payload, indent=2, sort_keys=True, default=float).encode())
