"""One load path: an adapter loaded through the API, by a start-up flag, on its first use from
--adapter-dir, or by another replica's load (the Ray Serve catalog) is read by the same function,
AdapterLoader.read, on the loader's reader threads, and registered by the engine."""
from __future__ import annotations

import argparse
import shutil
import threading
import time

import httpx
import pytest

from helpers import LiveServer
from quiver.server.families.loader import AdapterLoader


@pytest.fixture
def reads(monkeypatch):
    """(name, thread name) of every AdapterLoader.read call."""
    seen, read = [], AdapterLoader.read

    def counted(self, name, path):
        seen.append((name, threading.current_thread().name))
        return read(self, name, path)

    monkeypatch.setattr(AdapterLoader, "read", counted)
    return seen


@pytest.fixture
def served(reads, tiny_lora_set, plain_tokenizer, tmp_path):
    """`quiver serve`'s engine and app over the tiny model, built from its flags: one adapter by a
    start-up flag, a folder of adapters read on first use."""
    from quiver.server.assemble import add_engine_args, add_serve_args, build_server

    base_dir, _, paths = tiny_lora_set
    model = tmp_path / "tiny"
    shutil.copytree(base_dir, model)
    plain_tokenizer.save_pretrained(model)
    for name in ("on_disk", "replica"):
        shutil.copytree(paths["lora_qv"], tmp_path / "dir" / name)
    shutil.copytree(paths["dora"], tmp_path / "api")
    p = argparse.ArgumentParser()
    add_engine_args(p)
    add_serve_args(p)
    args = p.parse_args(["--model", str(model), "--dtype", "float32", "--num-kv-blocks", "64",
                         "--adapter", f"startup={paths['rslora_all7']}", "--adapter-dir", str(tmp_path / "dir"),
                         "--adapter-root", str(tmp_path)])
    return build_server(args)[0], tmp_path


def complete(server, model: str) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", json={"model": model, "prompt": "t5 t6", "max_tokens": 2,
                                                            "temperature": 0}, timeout=60)


def test_api_startup_first_use_and_the_ray_catalog_read_through_one_function(served, reads):
    from quiver.server.rayserve.catalog import apply

    engine, root = served
    assert [name for name, _ in reads] == ["startup"]  # the start-up flag, while the server was built
    with LiveServer(engine, adapter_root=root) as server:
        r = httpx.post(server.url + "/v1/adapters", json={"name": "api", "path": "api"}, timeout=60)
        assert r.status_code == 200, r.text
        assert complete(server, "on_disk").status_code == 200  # --adapter-dir: read on its first use
        shutil.copytree(root / "dir" / "replica", root / "elsewhere")  # another replica loads it from here:
        assert engine.submit(lambda e: apply(e, {"replica": "elsewhere"}, root)).result()
        assert complete(server, "replica").status_code == 200  # read on its first use here
        assert [name for name, _ in reads] == ["startup", "api", "on_disk", "replica"]
        assert all(thread.startswith("quiver-adapter-read") for _, thread in reads)
        listed = {a["name"]: a["tier"] for a in httpx.get(server.url + "/v1/adapters").json()["data"]}
        assert set(listed) == {"startup", "api", "on_disk", "replica"} and "disk" not in listed.values()
    # no reader outlives its read: a live thread that has run a parallel torch op slows the engine's own
    deadline = time.monotonic() + 10
    while any(t.name.startswith("quiver-adapter-read") for t in threading.enumerate()):
        assert time.monotonic() < deadline, [t.name for t in threading.enumerate()]
        time.sleep(0.05)
