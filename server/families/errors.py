"""What adapter management raises, for the engine to pass up and the HTTP layer to map to statuses."""
from __future__ import annotations

from quiver.adapters.errors import AdapterError


def shown(name: str, limit: int = 64) -> str:
    """A name as error messages quote it: repr, cut short."""
    return repr(name) if len(name) <= limit else repr(name[:limit]) + "..."


class UnknownAdapter(LookupError):
    def __init__(self, name: str):
        super().__init__(f"adapter {shown(name)} does not exist")
        self.name = name


class AdapterExists(ValueError):
    def __init__(self, name: str):
        super().__init__(f"adapter {shown(name)} is already loaded (unload it first to load another folder "
                         "under its name)")


class AdapterFailed(AdapterError):
    """A request names an adapter whose read from disk failed: it stays listed, unusable, until unloaded."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"adapter {name!r} failed to load: {reason}")


class AdapterInUse(RuntimeError):
    def __init__(self, name: str, users: int):
        super().__init__(f"adapter {shown(name)} is in use by {users} request(s); unload it when they have finished")
