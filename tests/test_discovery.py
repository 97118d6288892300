"""--adapter-dir discovery costs nothing per request: the dirs are listed at most once per interval and only
when they changed, the base model never lists them, unreadable entries are skipped (logged once), and a
folder still being copied is absent (never `failed`) until it holds its config and weights."""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time

import httpx
import pytest
from helpers import run_one

from quiver.server.engine.async_engine import AsyncEngine
from quiver.server.engine.config import EngineConfig
from quiver.server.engine.llm_engine import LLMEngine
from quiver.server.engine.sampling import SamplingParams
from quiver.server.families.discovery import AdapterDirs
from quiver.server.families.errors import UnknownAdapter
from quiver.server.http.app import create_app


@pytest.fixture
def engine(tiny_lora_set, plain_tokenizer):
    base_dir, _, _ = tiny_lora_set
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(base_dir), num_kv_blocks=32, max_model_len=64),
                       tokenizer=plain_tokenizer)
    clock = [100.0]
    engine.catalog._dirs.clock = lambda: clock[0]  # the interval runs on this clock, moved by hand
    engine.clock = clock
    return engine


@pytest.fixture
def listings(monkeypatch):
    """Every full listing of an adapter dir (the cost the interval bounds), as the dirs listed."""
    seen, real = [], AdapterDirs._list

    def spy(self, folder):
        seen.append(folder)
        return real(self, folder)

    monkeypatch.setattr(AdapterDirs, "_list", spy)
    return seen


def age(path, seconds: float = 60.0) -> None:
    """Set a path's mtime in the past (not 'too recent to trust')."""
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_a_burst_of_unknown_names_lists_5000_folders_at_most_once_per_interval(engine, listings, tmp_path):
    root = tmp_path / "adapters"
    root.mkdir()
    for i in range(5000):
        (root / f"a{i}").mkdir()
        (root / f"a{i}" / "adapter_config.json").write_text("{}")
        (root / f"a{i}" / "adapter_model.safetensors").write_bytes(b"")
    assert len(engine.add_adapter_dir(str(root))) == 5000
    assert len(listings) == 1
    front = AsyncEngine(engine)
    for i in range(300):  # a burst of unknown names: each looked up by name, the dir never listed
        front.discover(f"nope{i}")
    assert len(listings) == 1
    for _ in range(300):  # listings (GET /v1/models), within one interval: at most one
        engine.rescan()
    assert len(listings) <= 2
    engine.clock[0] += 1.5
    for _ in range(300):
        engine.rescan()
    assert len(listings) <= 3
    age(root)  # its mtime now differs from the one last listed: one listing, then none while unchanged
    engine.clock[0] += 1.5
    engine.rescan()
    n = len(listings)
    for _ in range(5):
        engine.clock[0] += 1.5
        engine.rescan()
    assert len(listings) == n
    for name in ("late", "later"):  # a folder added changes the dir's mtime
        (root / name).mkdir()
        (root / name / "adapter_config.json").write_text("{}")
        (root / name / "adapter_model.safetensors").write_bytes(b"")
    front.discover("late")  # a request's name is found at once, without a listing
    assert "late" in engine.catalog and len(listings) == n
    engine.rescan()
    assert "later" not in engine.catalog  # still within the interval
    engine.clock[0] += 1.5
    engine.rescan()
    assert "later" in engine.catalog and len(listings) == n + 1


def test_a_base_model_request_never_looks_at_the_dirs(engine, listings, tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    engine.add_adapter_dir(str(tmp_path))
    polls = []
    monkeypatch.setattr(AdapterDirs, "poll", lambda self, known: polls.append(1) or [])
    monkeypatch.setattr(AdapterDirs, "lookup", lambda self, name: polls.append(1) or [])
    front = AsyncEngine(engine)
    for _ in range(50):
        engine.clock[0] += 5
        front.discover(None)
    assert polls == [] and len(listings) == 1


@pytest.fixture
def unreadable(monkeypatch):
    """os.listdir raises PermissionError for folders named lost+found or locked (as for root-only ones; root
    itself would read them, so the refusal is simulated)."""
    real = os.listdir

    def listdir(path="."):
        if os.path.basename(os.fspath(path)) in ("lost+found", "locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "listdir", listdir)


def models(front) -> httpx.Response:
    async def get():
        transport = httpx.ASGITransport(app=create_app(front))
        async with httpx.AsyncClient(transport=transport, base_url="http://quiver") as client:
            return await client.get("/v1/models")
    return asyncio.run(get())


def test_an_unreadable_folder_is_skipped_with_one_log_line(engine, tiny_lora_set, unreadable, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="quiver.server.families")
    shutil.copytree(tiny_lora_set[2]["lora_qv"], tmp_path / "good")
    (tmp_path / "lost+found").mkdir()
    assert engine.add_adapter_dir(str(tmp_path)) == ["good"]  # start-up goes on
    front = AsyncEngine(engine)
    for _ in range(3):
        engine.clock[0] += 1.5
        front.discover("nope")
        r = models(front)
        assert r.status_code == 200 and {m["id"] for m in r.json()["data"]} >= {"good"}
    (tmp_path / "locked").mkdir()  # and one that appears while serving
    for _ in range(3):
        engine.clock[0] += 1.5
        front.discover("nope")
        assert models(front).status_code == 200
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    assert skipped == [f"skipping {tmp_path / name}: [Errno 13] Permission denied: '{tmp_path / name}'"
                       for name in ("lost+found", "locked")]


def test_a_folder_being_copied_is_absent_then_served_never_failed(engine, tiny_lora_set, tmp_path):
    source = tiny_lora_set[2]["lora_qv"]
    engine.add_adapter_dir(str(tmp_path))
    (tmp_path / "copying").mkdir()
    shutil.copy(source / "adapter_config.json", tmp_path / "copying")
    for _ in range(3):
        engine.clock[0] += 1.5
        engine.rescan("copying")
        with pytest.raises(UnknownAdapter):
            engine.prepare([5, 6], SamplingParams(max_tokens=1), "copying")
    shutil.copytree(source, tmp_path / ".copying.tmp")  # a copy under a hidden name is never looked at
    shutil.copy(source / "adapter_model.safetensors", tmp_path / "copying")  # the parent's mtime is unchanged
    engine.clock[0] += 1.5
    engine.rescan("copying")
    run_one(engine, "copying")
    assert engine.residency.tier("copying") != "failed" and engine.residency.is_resident("copying")
    assert engine.known_adapters() == ["copying"]


def test_a_folder_that_changed_while_read_is_absent_again_not_failed(engine, tiny_lora_set, tmp_path):
    """A read that failed on a file still being written: the name is forgotten, found again once complete."""
    shutil.copytree(tiny_lora_set[2]["lora_qv"], tmp_path / "x")
    weights = tmp_path / "x" / "adapter_model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:100])  # truncated when found
    assert engine.add_adapter_dir(str(tmp_path)) == ["x"]
    weights.write_bytes(whole)  # the copy goes on after the read began
    engine.residency.admit("x", ValueError("truncated safetensors header"))
    assert "x" not in engine.catalog and engine.catalog.failure("x") is None
    engine.clock[0] += 1.5
    engine.rescan("x")
    run_one(engine, "x")
    assert engine.residency.is_resident("x")


def test_a_folder_that_fails_unchanged_stays_failed(engine, tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text('{"peft_type": "NOPE"}')
    (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(b"")
    engine.add_adapter_dir(str(tmp_path))
    run_one(engine, "bad")
    assert engine.residency.tier("bad") == "failed"
