"""The adapter catalog: every name a request may use and the folder it is read from, whether the adapter
is in memory (loaded through the API or a start-up flag) or only on disk (found in --adapter-dir, or
loaded on another replica), and why a read failed. It is thread-safe: the HTTP side lists, checks and
refreshes it without waiting for the engine thread; residency (families.residency) holds what is read.
"""
from __future__ import annotations

import threading
from pathlib import Path

from quiver.server.families.discovery import AdapterDirs, signature
from quiver.server.families.errors import AdapterFailed, UnknownAdapter


class AdapterCatalog:
    def __init__(self):
        self._lock = threading.Lock()
        self._folders: dict[str, str] = {}  # name -> folder, in the order they became known
        self._failed: dict[str, str] = {}  # name -> why its read from disk failed
        self._scan_lock = threading.Lock()  # held while the adapter dirs are polled (a poll takes its own finds)
        self._dirs = AdapterDirs()  # --adapter-dir: polled again for names not known yet
        self._found: dict[str, tuple[Path, tuple]] = {}  # names found there -> (sub-folder, its signature)

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
            sub, _ = self._found.pop(name, (None, None))
        if sub is not None:  # found in an adapter dir: found again by the next poll, read afresh
            with self._scan_lock:
                self._dirs.pending.add(sub)

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
        a folder added later is found by a later refresh(). Returns the new names."""
        with self._scan_lock:
            return self._take(self._dirs.add(Path(folder), set(self._folders)))

    def refresh(self, name: str | None = None) -> None:
        """Make adapter folders that appeared in the adapter dirs known (any thread): the folder `name` (a
        stat per dir), or all (a clock read, and a listing at most once per interval: AdapterDirs.poll)."""
        with self._scan_lock:
            self._take(self._dirs.poll(set(self._folders)) if name is None else self._dirs.lookup(name))

    def changed(self, name: str) -> bool:
        """Whether the folder `name` was found in has changed since (a copy still in progress)."""
        sub, sig = self._found.get(name, (None, None))
        try:
            return sub is not None and signature(sub) != sig
        except OSError:
            return True

    def _take(self, found: list[tuple[Path, tuple]]) -> list[str]:
        added = []
        with self._lock:
            for sub, sig in found:
                if sub.name not in self._folders:
                    self._folders[sub.name] = str(sub.resolve())
                    self._found[sub.name] = (sub, sig)
                    added.append(sub.name)
        return added
