"""Files FedREX ships beside its code (model artifacts, the WordPiece vocabulary), found wherever
the code runs from.

`flwr run` runs the app from a Flower App Bundle, which carries code and small text files but never
weights or gzip'd data: there, such files are found in the installed package (a wheel's package
data, or an editable install's source folder). Standard library only: a device imports this.
"""

from __future__ import annotations

import json
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the folder holding models/ in this copy of the code


def installed_roots() -> list[Path]:
    """Folders holding ``models/`` in the installed FedREX distribution (none when not installed)."""
    from importlib import metadata

    try:
        dist = metadata.distribution("fedrex")
    except metadata.PackageNotFoundError:
        return []
    found = [Path(str(dist.locate_file("")))]
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    if str(direct.get("url", "")).startswith("file://"):
        found.append(Path(direct["url"][len("file://"):]))
    return found


def candidates(relative: str) -> list[Path]:
    """``relative`` (e.g. ``models/vocab.txt.gz``) beside this code first, then in the installed package."""
    return [root / relative for root in (SOURCE_ROOT, *installed_roots())]


def shipped_file(relative: str) -> Path:
    from models.errors import FedrexError

    for path in candidates(relative):
        if path.exists():
            return path
    raise FedrexError(f"FedREX's {relative} is missing here and in the installed package: reinstall FedREX "
                      "(pip install -e .)")
