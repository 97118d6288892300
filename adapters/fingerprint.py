"""An adapter's identity for the KV cache: a hash of the bytes it was read from, never of its name.

Cached KV blocks are keyed by it, so an adapter reloaded under the same name with new weights never
meets the blocks its old weights produced, and the same weights under two names share them. The files
are hashed as they are read (config_file.read_config and weights.read_weights note them), never read
again: a folder updated in place meanwhile cannot file old weights' KV under the new contents.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

CHUNK = 1 << 20
_reading: ContextVar[Reads | None] = ContextVar("quiver_adapter_reads", default=None)


class Reads:
    """The files one adapter read took, by name: the sha256 of each one's bytes."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.torn = False  # a file read twice with other bytes the second time

    def fingerprint(self) -> str | None:
        """sha256 over the names and hashes of the files read, in name order; None (its KV is never
        cached) when nothing was noted or a file changed between two reads of it."""
        if not self.files or self.torn:
            return None
        digest = hashlib.sha256()
        for name in sorted(self.files):
            digest.update(name.encode() + b"\0" + self.files[name])
        return digest.hexdigest()


def note(path: Path, digest: bytes | None) -> None:
    """Record the sha256 digest of the bytes an adapter read took from `path`; None: the file changed
    while it was read (nothing outside reading())."""
    reads = _reading.get()
    if reads is not None:
        reads.torn |= digest is None or reads.files.setdefault(Path(path).name, digest) != digest


def file_digest(f) -> bytes:
    """sha256 of an open file's bytes from where it stands, in chunks."""
    digest = hashlib.sha256()
    while chunk := f.read(CHUNK):
        digest.update(chunk)
    return digest.digest()


@contextmanager
def reading():
    """Collect the files read within (this thread or task only) into a Reads."""
    reads = Reads()
    token = _reading.set(reads)
    try:
        yield reads
    finally:
        _reading.reset(token)
