"""Tenant keys (--api-keys-file): what each bearer key may use, and the table the guard looks keys up in.

Keys are held only as SHA-256 digests and every lookup compares the token's digest with every entry in
constant time. A key's Access says which adapters it may name (names or fnmatch globs), whether it may use
the base model and whether it may manage adapters; the guard puts it on the request's state (`access`, and
the tenant's name as `tenant`), where the routes read it to answer an adapter outside it exactly as an
unknown name.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import re
import tomllib
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

FIELDS = ("key", "tenant", "adapters", "base", "admin")
TENANT = re.compile(r"[A-Za-z0-9._-]{1,64}")
HEX = re.compile(r"[0-9a-f]{64}")
MIN_KEY_CHARS = 16  # a plain key in a keys file; a digest says nothing of its key's length


@dataclass(frozen=True)
class Access:
    """What one key opens. tenant None: no tenant (no keys at all, or --api-key / --admin-key)."""
    tenant: str | None = None
    adapters: tuple[str, ...] = ("*",)
    base: bool = True
    admin: bool = True
    metrics: bool = True  # may read /metrics (every adapter's and tenant's series)

    def may_use(self, adapter: str | None) -> bool:
        """None: the base model."""
        if adapter is None:
            return self.base
        return any(fnmatchcase(adapter, pattern) for pattern in self.adapters)

    def visible(self, base_names: list[str], adapters: list[str]) -> list[str]:
        """The names of `base_names` and `adapters` this key may use, in order."""
        return [*(base_names if self.base else []), *(a for a in adapters if self.may_use(a))]


OPEN = Access()  # a server without keys, and routes reached without the guard


def access_of(request) -> Access:
    """The Access the guard put on `request` (OPEN where no guard runs)."""
    return getattr(request.state, "access", OPEN)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Keys:
    """SHA-256 digest -> Access."""

    def __init__(self, entries: list[tuple[str, Access]]):
        seen: set[str] = set()
        for d, _ in entries:
            if d in seen:
                raise ValueError("the same key is given twice (--api-key, --admin-key, --api-keys-file)")
            seen.add(d)
        self.entries = entries

    def lookup(self, token: str) -> Access | None:
        """The Access of `token`, None for no key; every entry is compared, in constant time each."""
        d, found = digest(token).encode(), None
        for entry, access in self.entries:
            if hmac.compare_digest(d, entry.encode()):
                found = access
        return found

    def tenants(self) -> list[str]:
        """The tenants' names (the bounded label set of their metrics)."""
        return sorted({a.tenant for _, a in self.entries if a.tenant is not None})


def read_keys_file(path: str) -> list[tuple[str, Access]]:
    """(digest, Access) for each entry of a TOML or JSON keys file: {keys: [{key, tenant, adapters, base,
    admin}]}. Raises ValueError, one line naming the file and the entry, on anything wrong."""
    where = f"--api-keys-file {path}"
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where}: cannot read it: {exc.strerror if isinstance(exc, OSError) else exc}") from None
    data = _parse(text, Path(path).suffix.lower(), where)
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, list) or not keys:
        raise ValueError(f"{where}: expected a non-empty list `keys` of tables (key, tenant, adapters, base, admin)")
    entries = [_entry(item, f"{where}: keys[{i}]") for i, item in enumerate(keys)]
    digests = [d for d, _ in entries]
    twice = next((i for i, d in enumerate(digests) if d in digests[:i]), None)
    if twice is not None:
        raise ValueError(f"{where}: keys[{twice}]: the same key as keys[{digests.index(digests[twice])}]")
    return entries


def _parse(text: str, suffix: str, where: str):
    parsers = {".json": (json.loads,), ".toml": (tomllib.loads,)}.get(suffix, (json.loads, tomllib.loads))
    for parse in parsers:
        try:
            return parse(text)
        except (ValueError, tomllib.TOMLDecodeError) as exc:
            error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    raise ValueError(f"{where}: not valid {'JSON or TOML' if len(parsers) > 1 else suffix[1:].upper()}: {error}")


def _entry(item, where: str) -> tuple[str, Access]:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a table with fields {', '.join(FIELDS)}")
    unknown = sorted(set(item) - set(FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)} (fields: {', '.join(FIELDS)})")
    key, tenant, adapters = item.get("key"), item.get("tenant"), item.get("adapters", [])
    if not isinstance(key, str) or not key:
        raise ValueError(f"{where}: `key` must be a non-empty string (the key, or sha256:<hex digest>)")
    if key.startswith("sha256:"):
        key = key.removeprefix("sha256:").lower()
        if not HEX.fullmatch(key):
            raise ValueError(f"{where}: `key` sha256:... must be 64 hexadecimal digits")
    elif len(key) < MIN_KEY_CHARS:
        raise ValueError(f"{where}: `key` has {len(key)} characters, at least {MIN_KEY_CHARS} are needed (a key "
                         "that can be guessed is no boundary between tenants; e.g. python3 -c 'import secrets; "
                         "print(secrets.token_urlsafe(32))')")
    else:
        key = digest(key)
    if not isinstance(tenant, str) or not TENANT.fullmatch(tenant):
        raise ValueError(f"{where}: `tenant` must be 1 to 64 letters, digits, '.', '_' or '-'")
    if not isinstance(adapters, list) or not all(isinstance(a, str) and a for a in adapters):
        raise ValueError(f"{where}: `adapters` must be a list of adapter names or globs")
    flags = {name: item.get(name, False) for name in ("base", "admin")}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{where}: `{name}` must be true or false")
    return key, Access(tenant, tuple(adapters), flags["base"], flags["admin"], metrics=flags["admin"])
