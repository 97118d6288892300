"""Adapter names and paths from untrusted requests: names are plain identifiers, paths must
resolve (symlinks included) inside the allowed root."""
from __future__ import annotations

import re
from pathlib import Path

from quiver.adapters.errors import AdapterError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class InvalidName(AdapterError):
    pass


class PathNotAllowed(AdapterError):
    pass


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise InvalidName(f"adapter name {name!r} is not allowed: use 1-64 characters from A-Z a-z 0-9 . _ -, "
                          "starting with a letter or digit")
    if name == "base":
        raise InvalidName("adapter name 'base' is not allowed: it labels the base model's metrics")
    return name


def resolve_path(path: str, root: str | Path) -> Path:
    """The adapter folder `path` (absolute, or relative to root), which must lie inside root."""
    root = Path(root).resolve()
    candidate = Path(path)
    try:
        resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
        is_dir = resolved.is_dir()
    except (ValueError, OSError) as exc:  # a NUL byte, a name too long for the file system, ...
        raise PathNotAllowed(f"adapter path {path!r} is not a usable path: {exc}") from None
    if not resolved.is_relative_to(root):
        raise PathNotAllowed(f"adapter path {path!r} resolves outside the adapter root {str(root)!r} (start the "
                             "server with --adapter-root DIR to allow loading from DIR)")
    if not is_dir:
        raise FileNotFoundError(f"adapter path {path!r} is not a folder")
    return resolved


def inside_folder(file: Path) -> Path:
    """`file`, an adapter file about to be opened, unless it resolves (a symlink) outside its folder."""
    folder = file.parent.resolve()
    if not file.resolve().is_relative_to(folder):
        raise PathNotAllowed(f"{file.parent.name}/{file.name} links out of its adapter folder; adapter files are "
                             "not read through links out of their folder")  # no server path in a client's answer
    return file
