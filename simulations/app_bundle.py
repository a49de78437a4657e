"""The Flower App that `fedrex simulate` hands to `flwr run`, staged without what it would skip.

`flwr run APP` builds the App Bundle by walking every file under APP and only then dropping what
.gitignore and Flower's publish rules exclude. In a checkout with its virtual environment inside
(`.venv`: about 58,000 files) the walk alone takes about 3 s of every simulation's start, for a
bundle of some 130 files. `stage_app` copies exactly the files Flower would keep into a folder of
their own, walking past the directories .gitignore names, and `flwr run` builds the same bundle
(byte for byte: `tests/test_federated.py`) from there. Flower's own rules decide what is kept."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from models.errors import FedrexError

STAGED_APP_PREFIX = "app-"  # the staged folders' names (the watchdog removes them after a kill -9)


def bundle_files(root: Path) -> dict[str, Path]:
    """The files (relative POSIX path -> path) Flower's `flwr run` would take from ``root``: its walk
    (symlinks skipped) with the directories .gitignore excludes left unvisited, then Flower's
    publish filter (.gitignore, include and exclude patterns, depth limit)."""
    from flwr.cli.utils import build_pathspec, filter_paths_for_publish, load_gitignore_patterns

    root = root.resolve()
    gitignore = root / ".gitignore"  # Flower skips a symlinked one, so its patterns do not apply there
    patterns = load_gitignore_patterns(gitignore) if not gitignore.is_symlink() else []
    # a directory .gitignore names ("x/") holds nothing the filter below would keep, unless a negated
    # pattern ("!x/keep.py") takes a file inside it back: then every directory is visited
    ignored = build_pathspec([] if any(p.startswith("!") for p in patterns) else patterns)
    found: dict[str, Path] = {}
    for folder, dirs, names in os.walk(root, followlinks=False):
        relative = Path(folder).relative_to(root)
        dirs[:] = [d for d in dirs if not ignored.match_file((relative / d).as_posix() + "/")]
        for name in names:
            path = Path(folder) / name
            if not path.is_symlink():
                found[(relative / name).as_posix()] = path
    return filter_paths_for_publish(found)


def stage_app(root: Path, parent: Path) -> Path:
    """Copy ``root``'s bundle files into a new ``STAGED_APP_PREFIX`` folder in ``parent`` and return
    the app folder inside it (whoever ran the app removes its parent). On any failure (a full disk,
    Flower's depth limit, a Ctrl-C) nothing is left behind; the first two are one FedrexError."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=STAGED_APP_PREFIX, dir=parent))
    except OSError as err:
        raise FedrexError(f"cannot write the Flower App's files under {parent}: {err}") from None
    try:
        app = folder / "fedrex"
        for relative, path in bundle_files(root).items():
            target = app / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        return app
    except BaseException as err:
        shutil.rmtree(folder, ignore_errors=True)
        if isinstance(err, (OSError, ValueError)):
            raise FedrexError(f"cannot stage the Flower App under {parent}: {err}") from None
        raise
