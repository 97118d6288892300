"""Finding adapter folders in --adapter-dir at a cost that does not grow with the requests.

A folder is listed again only when its mtime changed (or is too recent to trust on a coarse clock), and
at most once per `interval`, whoever asks (GET /v1/models); a request's unknown name is looked up
directly, one stat per dir. A sub-folder is an adapter once it holds adapter_config.json and a weights
file: until then (a copy in progress) it is absent, and looked at again at each poll, as the parent's
mtime does not change when files are written inside it. An entry that cannot be read is skipped, logged once; hidden ones (a copy
under a temporary name, as docs/adapters.md advises) are not looked at.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from quiver.adapters import bottleneck, lora
from quiver.adapters.paths import InvalidName, check_name

log = logging.getLogger("quiver.server.families")  # adapter management logs as one
INTERVAL = 1.0  # seconds between two polls of the adapter dirs, at most one each
RACY_NS = 2 * 10**9  # a dir modified this recently is listed again even if its mtime is unchanged
CONFIG = "adapter_config.json"
WEIGHT_FILES = (lora.WEIGHTS_FILE, lora.PICKLE_FILE, bottleneck.WEIGHTS_FILE, bottleneck.PICKLE_FILE)  # any one


def signature(folder: Path) -> tuple | None:
    """(name, size, mtime) of the config and weight files; None while the folder is not a complete adapter.
    Raises OSError for a folder that cannot be read."""
    names = set(os.listdir(folder))
    files = [CONFIG] + [w for w in WEIGHT_FILES if w in names]
    if CONFIG not in names or len(files) == 1:
        return None
    return tuple((f, (st := os.stat(folder / f)).st_size, st.st_mtime_ns) for f in files)


class AdapterDirs:
    """The adapter dirs and what is known of them; not thread-safe (the catalog polls under its lock)."""

    def __init__(self, interval: float = INTERVAL, clock=time.monotonic):
        self.dirs: list[Path] = []
        self.interval, self.clock = interval, clock
        self.pending: set[Path] = set()  # sub-folders that are not (complete) adapters yet
        self._mtimes: dict[Path, int] = {}
        self._logged: set[Path] = set()
        self._next = float("-inf")

    def add(self, folder: Path, known) -> list[tuple[Path, tuple]]:
        """List `folder` now (at start-up); its complete adapter folders not in `known`."""
        if folder not in self.dirs:
            self.dirs.append(folder)
        return self._collect([folder], known)

    def poll(self, known) -> list[tuple[Path, tuple]]:
        """New complete adapter folders (not in `known`), unless the last poll was under `interval` ago."""
        now = self.clock()
        if not self.dirs or now < self._next:
            return []
        self._next = now + self.interval
        return self._collect([d for d in self.dirs if self._changed(d)], known)

    def lookup(self, name: str) -> list[tuple[Path, tuple]]:
        """The complete adapter folder `name` in the adapter dirs, if any: a request's unknown name is looked
        up directly (a stat per dir, no listing), so a folder is served as soon as it is complete."""
        try:
            check_name(name)
        except InvalidName:
            return []
        for folder in self.dirs:
            sub = folder / name
            try:
                sig = signature(sub)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                self._skip(sub, exc)
                continue
            if sig is not None:
                self.pending.discard(sub)
                return [(sub, sig)]
        return []

    def _changed(self, folder: Path) -> bool:
        try:
            mtime = os.stat(folder).st_mtime_ns
        except OSError as exc:
            self._skip(folder, exc)
            return False
        return self._mtimes.get(folder) != mtime or time.time_ns() - mtime < RACY_NS

    def _list(self, folder: Path) -> list[Path]:
        """The sub-folders of an adapter dir (the one full listing: the cost the interval bounds)."""
        self._mtimes[folder] = os.stat(folder).st_mtime_ns
        with os.scandir(folder) as entries:
            return [Path(e.path) for e in entries if not e.name.startswith(".") and e.is_dir()]

    def _collect(self, folders: list[Path], known) -> list[tuple[Path, tuple]]:
        subs = set(self.pending)
        for folder in folders:
            try:
                subs.update(self._list(folder))
            except OSError as exc:
                self._skip(folder, exc)
        found = []
        for sub in sorted(subs):
            self.pending.discard(sub)
            if sub.name in known:
                continue
            try:
                sig = signature(sub)
                if sig is not None:
                    check_name(sub.name)
            except InvalidName as exc:
                self._skip(sub, exc)
                continue
            except FileNotFoundError:
                continue  # removed meanwhile
            except OSError as exc:
                self._skip(sub, exc)
                sig = None
            if sig is None:
                self.pending.add(sub)
            else:
                found.append((sub, sig))
        return found

    def _skip(self, path: Path, why: Exception) -> None:
        if path not in self._logged:
            self._logged.add(path)
            log.warning("skipping %s: %s", path, why)
