"""An adapter's identity for the KV cache: a hash of what it is read from, never of its name.

Cached KV blocks are keyed by it, so an adapter reloaded under the same name with new weights never
meets the blocks its old weights produced, and the same weights under two names share them.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20
# what the families read: the configs and the weight files (not optimizer states or READMEs)
READ_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter.safetensors", "pytorch_adapter.bin")


def fingerprint(folder: str | Path) -> str:
    """sha256 over the folder's JSON files and adapter weight files (names and bytes, in name order)."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and (p.suffix == ".json" or p.name in READ_FILES))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()
