"""Reading an adapter's adapter_config.json: bounded in size, a JSON object, or a clear error."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from quiver.adapters.errors import AdapterError
from quiver.adapters.fingerprint import note
from quiver.adapters.paths import inside_folder

MAX_CONFIG_BYTES = 1 << 20  # a real adapter config is a few kB


def read_config(file: Path) -> dict:
    if not file.is_file():
        raise AdapterError(f"{file}: not found (an adapter folder needs adapter_config.json)")
    with inside_folder(file).open("rb") as f:  # its bytes: parsed and fingerprinted from the same read
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise AdapterError(f"{file}: exceeds the adapter config size limit of {MAX_CONFIG_BYTES} bytes")
    note(file, hashlib.sha256(data).digest())
    try:
        cfg = json.loads(data.decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{file}: not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise AdapterError(f"{file}: expected a JSON object")
    return cfg


def finite_number(value, what: str, file: Path, limit: float = 1e6) -> float:
    """A config scalar that scales weights: a real number with |value| <= limit, else an AdapterError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= limit:
        raise AdapterError(f"{file}: {what}={value!r} is not a finite number within +-{limit:g}")
    return float(value)
