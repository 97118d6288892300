"""The adapter catalog: every name a request may use and the folder it is read from, whether the adapter
is in memory (loaded through the API or a start-up flag) or only on disk (found in --adapter-dir, or
loaded on another replica), and why a read failed. It is thread-safe: the HTTP side lists, checks and
rescans it without waiting for the engine thread; residency (families.residency) holds what is read.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

from quiver.adapters.paths import InvalidName, check_name
from quiver.server.families.errors import AdapterFailed, UnknownAdapter

log = logging.getLogger("quiver.server.families")  # adapter management logs as one


class AdapterCatalog:
    def __init__(self):
        self._lock = threading.Lock()
        self._folders: dict[str, str] = {}  # name -> folder, in the order they became known
        self._failed: dict[str, str] = {}  # name -> why its read from disk failed
        self.dirs: list[Path] = []  # --adapter-dir: scanned again for names not known yet

    def __contains__(self, name: str) -> bool:
        return name in self._folders

    def folder(self, name: str) -> str | None:
        return self._folders.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._folders)

    def know(self, name: str, folder: str) -> None:
        with self._lock:
            self._folders[name] = folder

    def forget(self, name: str) -> None:
        with self._lock:
            self._folders.pop(name, None)
            self._failed.pop(name, None)

    def fail(self, name: str, reason: str) -> None:
        """Mark a known adapter unusable until it is unloaded (its read from disk failed)."""
        with self._lock:
            if name in self._folders:
                self._failed[name] = reason

    def failure(self, name: str) -> str | None:
        return self._failed.get(name)

    def check_usable(self, name: str) -> None:
        """Raise UnknownAdapter or AdapterFailed for a name a request may not use."""
        if name not in self._folders:
            raise UnknownAdapter(name)
        reason = self._failed.get(name)
        if reason is not None:
            raise AdapterFailed(name, reason)

    def add_dir(self, folder: str) -> list[str]:
        """Make every adapter folder in `folder` known by its folder name; each is read on first use, and
        a folder added later is found by the next scan. Returns the new names."""
        with self._lock:
            if Path(folder) not in self.dirs:
                self.dirs.append(Path(folder))
        return self.scan([Path(folder)])

    def scan(self, folders: list[Path] | None = None) -> list[str]:
        """Make the adapter folders in `folders` (default: every adapter dir) known; the new names."""
        found = []
        for sub in sorted(p for folder in (self.dirs if folders is None else folders) for p in folder.iterdir()):
            if not (sub / "adapter_config.json").is_file():
                continue
            try:
                check_name(sub.name)
            except InvalidName as exc:
                log.warning("skipping %s: %s", sub, exc)
                continue
            found.append((sub.name, str(sub.resolve())))
        added = []
        with self._lock:
            for name, path in found:
                if name not in self._folders:
                    self._folders[name] = path
                    added.append(name)
        return added
