"""The file format of a text defence's word table, as a device stores it: gzip'd lines of
"word TAB value", sorted by word (the synonym encoding's representatives, smoothing's substitutes)."""

from __future__ import annotations

import gzip

from models.errors import FedrexError


def to_bytes(table: dict[str, str]) -> bytes:
    return gzip.compress("".join(f"{w}\t{v}\n" for w, v in sorted(table.items())).encode(), mtime=0)


def from_bytes(blob: bytes, what: str) -> dict[str, str]:
    """The table in ``blob``; anything else is refused as "not a ``what``"."""
    try:
        return dict(line.split("\t") for line in gzip.decompress(blob).decode().splitlines())
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as err:
        raise FedrexError(f"not a {what} ({type(err).__name__})") from None
