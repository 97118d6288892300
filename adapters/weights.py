"""Reading an adapter's weight file: safetensors by default, a pickle only when allowed."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from quiver.adapters.errors import AdapterError
from quiver.adapters.fingerprint import file_digest, note
from quiver.adapters.paths import inside_folder


def _identity(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def read_weights(folder: Path, safetensors_name: str, pickle_name: str, allow_pickle: bool = False,
                 max_bytes: int | None = None) -> tuple[dict[str, torch.Tensor], Path]:
    """The adapter's tensors (checked: floating point, finite) and the file they came from."""
    file = folder / safetensors_name
    if not file.is_file():
        pickled = folder / pickle_name
        if not pickled.is_file():
            raise AdapterError(f"{file}: not found")
        if not allow_pickle:
            raise AdapterError(f"{pickled}: pickle checkpoints are not read (only {safetensors_name}; "
                               "start the server with --allow-pickle to read them)")
        file = pickled
    size = file.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise AdapterError(f"{file}: {size / 2**20:.1f} MiB exceeds the adapter size limit of "
                           f"{max_bytes / 2**20:.0f} MiB (--max-adapter-mb)")
    with inside_folder(file).open("rb") as f:  # hashed through the file safetensors then maps: the bytes it reads
        before, digest = _identity(os.fstat(f.fileno())), file_digest(f)
    try:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as st:
                tensors = {k: st.get_tensor(k) for k in st.keys()}
        else:
            tensors = torch.load(file, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, ValueError, RuntimeError, EOFError) as exc:
        raise AdapterError(f"{file}: cannot be read as {'safetensors' if file.suffix == '.safetensors' else 'a checkpoint'} "
                           f"({exc})") from exc
    note(file, digest if _identity(file.stat()) == before else None)  # changed meanwhile: never cached
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise AdapterError(f"{file}: expected a mapping of names to tensors")
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise AdapterError(f"{file}: tensor {key!r} has dtype {t.dtype}, expected floating point")
        if not torch.isfinite(t).all():
            raise AdapterError(f"{file}: tensor {key!r} contains NaN or Inf")
    return tensors, file
