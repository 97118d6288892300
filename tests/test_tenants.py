"""Tenant keys (--api-keys-file) over HTTP: each key uses and sees only its adapters (another tenant's answers
exactly as an unknown name), the base model only when allowed, adapter management only as an admin, its
requests counted under its tenant; the file's SHA-256 form; a bad file a one-line start-up error; and the
guard's paths matched below a mount's root path."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re

import httpx
import pytest
from helpers import LiveServer
from peft_fixtures import lora_variants, make_adapter
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from quiver.server.cli import main
from quiver.server.http.guard import Guard, install
from quiver.server.http.tenants import read_keys_file

A, B, OPS, LEGACY = "key-acme-1111-aaaa", "key-bolt-2222-bbbb", "key-ops-3333-cccc", "key-legacy-4444"
KEYS_TOML = f"""
[[keys]]
key = "{A}"
tenant = "acme"
adapters = ["a-*"]
base = true

[[keys]]
key = "sha256:{hashlib.sha256(B.encode()).hexdigest().upper()}"
tenant = "bolt"
adapters = ["b-secret"]

[[keys]]
key = "{OPS}"
tenant = "ops"
adapters = ["*"]
base = true
admin = true
"""
PROMPT = [101, 2020, 333, 47]


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.toml"
    path.write_text(KEYS_TOML)
    return path


@pytest.fixture(scope="module")
def server(api_model, tokenizer, keys_file, tmp_path_factory):
    with tenant_server(api_model, tokenizer, keys_file, tmp_path_factory.mktemp("tenant_adapters")) as live:
        yield live


@contextlib.contextmanager
def tenant_server(api_model, tokenizer, keys_file, root, scope="tenant"):
    from quiver.server.engine.async_engine import AsyncEngine
    from quiver.server.engine.config import EngineConfig
    from quiver.server.engine.llm_engine import LLMEngine
    from quiver.server.engine.metrics import Metrics

    from quiver.server.http.limits import RequestLimits

    base_dir, hf = api_model
    lora = lora_variants(hf.config.num_hidden_layers)["lora_qv"]
    for seed, name in enumerate(("a-sql", "b-secret")):
        make_adapter(hf, root / name, lora, seed=700 + seed)
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(base_dir), num_kv_blocks=96, block_size=4,
                                    max_model_len=128, served_model_name="tiny"), tokenizer=tokenizer)
    engine.add_adapter_dir(str(root))
    guard = Guard(api_key=LEGACY, tenants=read_keys_file(str(keys_file)))
    with LiveServer(AsyncEngine(engine, Metrics()), adapter_root=root, guard=guard,
                    limits=RequestLimits(prefix_cache_scope=scope)) as live:
        yield live


def call(server, method, path, key, body=None):
    return httpx.request(method, server.url + path, json=body, headers={"Authorization": f"Bearer {key}"},
                         timeout=60)


def complete(server, key, **names):
    return call(server, "POST", "/v1/completions", key, {"prompt": PROMPT, "max_tokens": 2, **names})


def listed(server, key) -> list[str]:
    r = call(server, "GET", "/v1/models", key)
    assert r.status_code == 200, r.text
    return [m["id"] for m in r.json()["data"]]


def same_as_unknown(unknown: httpx.Response, hidden: httpx.Response, unknown_name: str, hidden_name: str) -> None:
    """The answer for a name the key may not use is the answer for a name that does not exist: same status,
    same body but for the client's own string."""
    assert hidden.status_code == unknown.status_code == 404
    assert hidden.text.replace(hidden_name, "NAME") == unknown.text.replace(unknown_name, "NAME")


def test_a_tenant_cannot_use_or_see_anothers_adapter(server):
    assert complete(server, A, model="a-sql").status_code == 200
    assert complete(server, B, model="b-secret").status_code == 200
    for field in ("model", "adapter"):
        unknown = complete(server, A, **{field: "b-nothing"})
        same_as_unknown(unknown, complete(server, A, **{field: "b-secret"}), "b-nothing", "b-secret")
        assert "b-secret" not in unknown.text  # the 404 lists only what A may use
    same_as_unknown(call(server, "GET", "/v1/models/b-nothing", A), call(server, "GET", "/v1/models/b-secret", A),
                    "b-nothing", "b-secret")
    assert listed(server, A) == ["tiny", "a-sql"]
    assert listed(server, B) == ["b-secret"]
    assert sorted(listed(server, OPS)) == sorted(listed(server, LEGACY)) == ["a-sql", "b-secret", "tiny"]
    assert call(server, "GET", "/v1/models/a-sql", A).status_code == 200


def test_the_base_model_only_where_the_key_allows_it(server):
    assert complete(server, A, model="tiny").status_code == 200
    assert complete(server, A).status_code == 200
    same_as_unknown(complete(server, B, model="nothing"), complete(server, B, model="tiny"), "nothing", "tiny")
    same_as_unknown(call(server, "GET", "/v1/models/nothing", B), call(server, "GET", "/v1/models/tiny", B),
                    "nothing", "tiny")


def test_adapter_management_needs_an_admin_key(server):
    for key in (A, B, "wrong"):
        assert call(server, "POST", "/v1/adapters", key, {"name": "a-new", "path": "a-sql"}).status_code == 401
        assert call(server, "POST", "/v1/unload_lora_adapter", key, {"lora_name": "a-sql"}).status_code == 401
        assert call(server, "DELETE", "/v1/adapters/a-sql", key).status_code == 401
        assert call(server, "GET", "/v1/adapters", key).status_code == 401
    assert call(server, "POST", "/v1/adapters", OPS, {"name": "a-new", "path": "a-sql"}).status_code == 200
    assert "a-new" in listed(server, A) and "a-new" not in listed(server, B)  # A's glob takes it in
    assert call(server, "DELETE", "/v1/adapters/a-new", LEGACY).status_code == 200  # --api-key: an admin key
    assert "a-sql" in listed(server, A)


def tenant_counts(server) -> dict[str, float]:
    text = call(server, "GET", "/metrics", OPS).text
    return {m[1]: float(m[2]) for m in re.finditer(r'^quiver_tenant_requests_total\{tenant="([^"]*)"\} (\S+)$',
                                                   text, re.M)}


def test_requests_counted_per_tenant_of_the_file_only(server):
    before = tenant_counts(server)
    assert set(before) == {"acme", "bolt", "ops"}
    for key, model in ((A, "a-sql"), (A, "tiny"), (B, "b-secret"), (LEGACY, "tiny")):
        assert complete(server, key, model=model).status_code == 200
    after = tenant_counts(server)
    assert {t: after[t] - before[t] for t in after} == {"acme": 2, "bolt": 1, "ops": 0}
    assert call(server, "GET", "/metrics", A).status_code == 401  # every tenant's series: admins only


def test_keys_are_held_as_sha256_digests(keys_file):
    entries = read_keys_file(str(keys_file))
    digests = [d for d, _ in entries]
    assert digests == [hashlib.sha256(k.encode()).hexdigest() for k in (A, B, OPS)]
    assert not any(k in repr(entries) for k in (A, B, OPS))
    guard = Guard(tenants=entries)
    assert guard.keys.lookup(B).tenant == "bolt" and guard.keys.lookup("sha256:" + digests[1]) is None


BAD_FILES = {
    "bad.toml": ("[[keys]\nkey = 1", "not valid TOML"),
    "bad.json": ('{"keys": [{"key": "k-0123456789abcdef", "tenant": "t", "admins": true}]}', "keys[0]: unknown field(s) admins"),
    "empty.toml": ("", "expected a non-empty list `keys`"),
    "notenant.toml": ('[[keys]]\nkey = "k-0123456789abcdef"', "keys[0]: `tenant`"),
    "weak.toml": ('[[keys]]\nkey = "hunter2"\ntenant = "t"', "keys[0]: `key` has 7 characters, at least 16"),
    "short.toml": ('[[keys]]\nkey = "sha256:abc"\ntenant = "t"', "keys[0]: `key` sha256:... must be 64"),
    "flag.json": ('{"keys": [{"key": "k-0123456789abcdef", "tenant": "t", "base": "yes"}]}', "keys[0]: `base` must be true"),
    "twice.json": (json.dumps({"keys": [{"key": "k" * 16, "tenant": "t"}, {"key": "k" * 16, "tenant": "u"}]}),
                   "keys[1]: the same key as keys[0]"),
}


@pytest.mark.parametrize("name", [*BAD_FILES, "missing.toml"])
def test_a_bad_keys_file_is_a_one_line_startup_error(name, tmp_path, capsys):
    path = tmp_path / name
    text, needle = BAD_FILES.get(name, (None, "cannot read it"))
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit) as e:
        main(["serve", "--api-keys-file", str(path), "--port", "0"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"quiver serve: error: --api-keys-file {path}") and needle in err, err


class NoEngine:
    metrics = None
    draining = False


def test_the_guard_matches_routes_below_a_mounts_root_path():
    """Mounted at /api, the routes see /api/v1/adapters; the guard must still take it as adapter management."""
    asyncio.run(_mounted())


async def _mounted():
    inner = Starlette(routes=[Route(p, lambda _: PlainTextResponse("reached"), methods=["GET", "POST"])
                              for p in ("/v1/adapters", "/v1/models", "/health")])
    install(inner, NoEngine(), Guard(api_key="user", admin_key="admin"))
    outer = Starlette(routes=[Mount("/api", app=inner)])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(outer), base_url="http://t") as client:
        async def status(path, key=None):
            return (await client.get(path, headers={"Authorization": f"Bearer {key}"} if key else {})).status_code
        assert await status("/api/v1/adapters", "user") == 401
        assert await status("/api/v1/adapters", "admin") == 200
        assert await status("/api/v1/models") == 401
        assert await status("/api/v1/models", "user") == 200
        assert await status("/api/health") == 200


LONG = list(range(40, 53))  # three full blocks of 4 tokens, and one more


def cached(server, key, **fields) -> int:
    r = call(server, "POST", "/v1/completions", key, {"prompt": LONG, "max_tokens": 1, **fields})
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_a_tenant_never_hits_another_tenants_cached_prefix(server):
    """Tenant keys salt prefix-cache blocks with their tenant: ops' prompt is no hit for acme (so neither
    cached_tokens nor time tells acme what ops sent), acme's own repeat is; and within one tenant, two
    cache_salts do not share."""
    assert cached(server, OPS) == 0
    assert cached(server, OPS) == 12  # ops' own repeat hits its three full blocks
    assert cached(server, A) == 0  # the same prompt from another tenant
    assert cached(server, A) == 12
    assert cached(server, A, cache_salt="x") == 0 and cached(server, A, cache_salt="y") == 0
    assert cached(server, A, cache_salt="x") == 12


def test_global_scope_shares_prefixes_between_tenants(api_model, tokenizer, keys_file, tmp_path):
    with tenant_server(api_model, tokenizer, keys_file, tmp_path, scope="global") as live:
        assert cached(live, OPS) == 0
        assert cached(live, A) == 12  # an operator's shared prefix: every tenant reuses it
        assert cached(live, A, cache_salt="x") == 0  # a client's own salt still separates
