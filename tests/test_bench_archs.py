"""Benchmarks on every architecture's small random shape: `quiver bench archs` writes one row per
architecture with both sides' rates and their ratio; families and workload take a shape's name as --model
(no timing asserted)."""
from __future__ import annotations

import json

from quiver.bench.models import ARCH_SHAPES, bench_model
from quiver.server.model.archs import ARCHS


def test_every_supported_architecture_has_a_bench_shape():
    assert set(ARCH_SHAPES) == set(ARCHS)


def test_a_shape_name_becomes_a_random_model_of_that_type_and_a_folder_stays_a_folder(tmp_path):
    path = bench_model("gemma2", tmp_path)
    config = json.loads((tmp_path / "gemma2" / "config.json").read_text())
    assert path == str(tmp_path / "gemma2") and config["model_type"] == "gemma2"
    assert bench_model(path, tmp_path / "other") == path and bench_model(None, tmp_path) is None


def test_archs_bench_smoke(tmp_path):
    from quiver.bench import archs

    out = tmp_path / "results"
    archs.main(["--archs", "qwen3", "gemma2", "--batch", "2", "--prompt-tokens", "4", "--new-tokens", "3",
                "--repeats", "1", "--threads", "1", "--out", str(out)])
    data = json.loads((out / "archs.json").read_text())
    assert [r["arch"] for r in data["rows"]] == ["qwen3", "gemma2"]
    for row in data["rows"]:
        assert row["quiver_decode_tokens_per_s"] > 0 and row["transformers_decode_tokens_per_s"] > 0
        assert abs(row["ratio"] - row["quiver_decode_tokens_per_s"] / row["transformers_decode_tokens_per_s"]) < 1e-9
    assert data["threads"] == 1


def test_families_bench_on_an_architecture_shape(tmp_path):
    from quiver.bench import families

    out = tmp_path / "results"
    families.main(["--model", "qwen3", "--adapters", "1", "--batch", "3", "--new-tokens", "3", "--virtual-tokens", "2",
                   "--rank", "4", "--out", str(out)])
    data = json.loads((out / "families.json").read_text())
    assert data["rows"][0]["family"] == "base" and all(r["decode_tokens_per_s"] > 0 for r in data["rows"])


def test_workload_bench_on_an_architecture_shape(tmp_path):
    from quiver.bench import workload

    out = tmp_path / "results"
    workload.main(["--model", "gemma3_text", "--dtypes", "float32", "--requests", "2", "--new-tokens", "2",
                   "--repeats", "1", "--threads", "1", "--out", str(out)])
    rows = json.loads((out / "workload.json").read_text())["rows"]
    assert [r["mix"] for r in rows] == ["8 LoRA adapters", "base only"]
    assert all(r["median_tokens_per_s"] > 0 for r in rows)
