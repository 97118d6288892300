"""Adapters loaded and unloaded through the API of a Ray Serve deployment, on every replica.

A load or unload goes to one replica, which checks and applies it as the single server does; when it
succeeds the ingress records it here. Every later call carries the record, and a replica that has not
applied its version yet applies it first: a loaded adapter becomes known there by its folder and is
read on first use, an unloaded one is forgotten (once no request of that replica uses it).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from quiver.server.engine.public import AdapterInUse, resolve_path
from quiver.server.rayserve.asgi_call import HttpCall

log = logging.getLogger(__name__)
UNLOAD_PREFIX = "/v1/adapters/"


@dataclass
class Catalog:
    version: int = 0
    changes: dict[str, str | None] = field(default_factory=dict)  # name -> the path the request gave; None: unloaded

    def snapshot(self) -> Catalog:
        """A copy to send: Serve may serialize a call's arguments on its router's own thread."""
        return Catalog(self.version, dict(self.changes))

    def record(self, name: str, path: str | None) -> None:
        self.changes.pop(name, None)  # the latest change last
        self.changes[name] = path
        self.version += 1


def adapter_change(call: HttpCall) -> tuple[str, str | None] | None:
    """(name, path) of a load, (name, None) of an unload, through either route family; None for any other
    call (and for a body the replica will refuse)."""
    if call.method == "DELETE" and call.path.startswith(UNLOAD_PREFIX):
        return call.path[len(UNLOAD_PREFIX):], None
    keys = {"/v1/adapters": ("name", "path"), "/v1/load_lora_adapter": ("lora_name", "lora_path"),
            "/v1/unload_lora_adapter": ("lora_name", None)}.get(call.path)
    if call.method != "POST" or keys is None:
        return None
    try:
        body = json.loads(call.body)
        name, path = body[keys[0]], body[keys[1]] if keys[1] else None
    except (ValueError, TypeError, KeyError):
        return None
    return (name, path) if isinstance(name, str) and (path is None or isinstance(path, str)) else None


def apply(registry, changes: dict[str, str | None], root: Path) -> bool:
    """Bring `registry` to `changes` (on the engine thread); False while an unload waits on running requests."""
    complete = True
    for name, path in changes.items():
        try:
            folder = None if path is None else str(resolve_path(path, root))
        except (ValueError, OSError) as exc:  # checked where it was loaded; here the folder is missing
            log.warning("adapter %s, loaded through the API on another replica, is not readable here: %s", name, exc)
            continue
        if registry.known.get(name) == folder:
            continue
        if name in registry.known:
            try:
                registry.unregister(name)
            except AdapterInUse:
                complete = False
                continue
        if folder is not None:
            registry.know(name, folder)
    return complete
