"""The throughput benchmark runs end to end at tiny sizes and writes sane JSON (no timing asserted)."""
from __future__ import annotations

import json
import shutil

from helpers import auto_cpu_dtype


def _model_with_tokenizer(api_model, tokenizer, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(api_model[0], model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def test_throughput_bench_smoke(api_model, tokenizer, tmp_path):
    from quiver.bench import throughput

    model_dir = _model_with_tokenizer(api_model, tokenizer, tmp_path)
    out = tmp_path / "results"
    throughput.main(["--model", str(model_dir), "--concurrency", "1", "3", "--new-tokens", "4", "--no-server",
                     "--out", str(out)])
    data = json.loads((out / "throughput.json").read_text())
    assert [r["concurrency"] for r in data["rows"]] == [1, 3]
    for row in data["rows"]:
        assert row["quiver_tokens_per_s"] > 0 and row["transformers_tokens_per_s"] > 0
        assert abs(row["ratio"] - row["quiver_tokens_per_s"] / row["transformers_tokens_per_s"]) < 1e-9
    assert data["machine"]["cores"] >= 1 and data["threads"] >= 1
    assert (data["device"], data["dtype"]) == ("cpu", auto_cpu_dtype())
    assert "cuda_max_memory_allocated_mib" not in data


def test_adapters_bench_smoke(api_model, tokenizer, tmp_path):
    from quiver.bench import adapters

    model_dir = _model_with_tokenizer(api_model, tokenizer, tmp_path)
    out = tmp_path / "results"
    adapters.main(["--model", str(model_dir), "--adapters", "1", "2", "--batch", "4", "--new-tokens", "3",
                   "--rank", "4", "--out", str(out)])
    data = json.loads((out / "adapters.json").read_text())
    assert [r["distinct_adapters"] for r in data["rows"]] == [1, 2]
    for row in data["rows"]:
        for key in ("quiver_tokens_per_s", "quiver_base_tokens_per_s", "peft_tokens_per_s"):
            assert row[key] > 0
        assert abs(row["quiver_vs_peft"] - row["quiver_tokens_per_s"] / row["peft_tokens_per_s"]) < 1e-9
    assert (out / "adapters.png").stat().st_size > 1000
    assert (data["device"], data["dtype"]) == ("cpu", auto_cpu_dtype())


def test_families_bench_smoke(api_model, tokenizer, tmp_path):
    from quiver.bench import families

    model_dir = _model_with_tokenizer(api_model, tokenizer, tmp_path)
    out = tmp_path / "results"
    families.main(["--model", str(model_dir), "--adapters", "2", "--batch", "5", "--new-tokens", "3",
                   "--virtual-tokens", "3", "--rank", "4", "--out", str(out)])
    data = json.loads((out / "families.json").read_text())
    assert [r["family"] for r in data["rows"]] == ["base", "lora", "prompt_tuning", "p_tuning", "prefix_tuning",
                                                   "bottleneck", "mixed"]
    for row in data["rows"]:
        assert row["decode_tokens_per_s"] > 0 and row["end_to_end_tokens_per_s"] > 0
        assert abs(row["decode_vs_base"] - row["decode_tokens_per_s"] / row["base_decode_tokens_per_s"]) < 1e-9
    assert (out / "families.png").stat().st_size > 1000
    assert (data["device"], data["dtype"]) == ("cpu", auto_cpu_dtype())


def test_hotload_bench_smoke(api_model, tokenizer, tmp_path):
    import socket

    from quiver.bench import hotload

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model_dir = _model_with_tokenizer(api_model, tokenizer, tmp_path)
    out = tmp_path / "results"
    hotload.main(["--model", str(model_dir), "--repeats", "2", "--rank", "4", "--virtual-tokens", "3",
                  "--port", str(port), "--out", str(out)])
    data = json.loads((out / "hotload.json").read_text())
    assert [r["adapter"] for r in data["rows"]] == ["lora", "prefix"]
    for row in data["rows"]:
        assert len(row["all_ms"]) == 2 and all(v > 0 for v in row["all_ms"])
        assert row["max_ms"] >= row["median_ms"] > 0
    assert (data["device"], data["dtype"]) == ("cpu", auto_cpu_dtype())


def test_latency_bench_smoke(api_model, tokenizer, tmp_path):
    from quiver.bench import latency

    model_dir = _model_with_tokenizer(api_model, tokenizer, tmp_path)
    out = tmp_path / "results"
    latency.main(["--model", str(model_dir), "--concurrency", "1", "3", "--prompt-tokens", "8", "--new-tokens", "4",
                  "--repeats", "2", "--rank", "4", "--out", str(out)])
    data = json.loads((out / "latency.json").read_text())
    assert [r["concurrency"] for r in data["rows"]] == [1, 3]
    for row in data["rows"]:
        for variant in ("base", "merged", "unmerged"):
            x = row[variant]
            assert 0 < x["ttft_median_ms"] <= x["ttft_p90_ms"] and 0 < x["tpot_median_ms"] <= x["tpot_p90_ms"]
        assert abs(row["unmerged_vs_merged_tpot"] - row["unmerged"]["tpot_median_ms"]
                   / row["merged"]["tpot_median_ms"]) < 1e-9
    assert data["repeats"] == 2 and data["machine"]["cores"] >= 1
    assert (out / "latency.png").stat().st_size > 1000
    assert (data["device"], data["dtype"]) == ("cpu", auto_cpu_dtype())


def test_device_args_and_helpers():
    import argparse

    from quiver.bench.common import add_device_args, cuda_peak, dtype_name, release
    from quiver.server.engine.config import DTYPES

    ap = argparse.ArgumentParser()
    add_device_args(ap)
    args = ap.parse_args([])
    assert (args.device, args.dtype) == ("cpu", "auto")
    args = ap.parse_args(["--device", "cuda:1", "--dtype", "bfloat16"])
    assert (args.device, args.dtype) == ("cuda:1", "bfloat16")
    assert {a.dest: a.choices for a in ap._actions}["dtype"] == DTYPES
    assert cuda_peak("cpu") == {}
    release("cpu")
    import torch
    assert dtype_name(torch.bfloat16) == "bfloat16"


def test_attention_bench_smoke(tmp_path):
    from quiver.bench import attention

    scenario = "decode 32, contexts 100-600"
    for dtype, want in (("auto", auto_cpu_dtype()), ("bfloat16", "bfloat16"), ("float16", "float16")):
        out = tmp_path / dtype
        attention.main(["--repeats", "1", "--scenarios", scenario, "--dtype", dtype, "--out", str(out)])
        data = json.loads((out / "attention.json").read_text())
        assert (data["device"], data["dtype"]) == ("cpu", want)
        (row,) = data["results"]
        assert row["scenario"] == scenario and all(row[f"{m}_ms"] > 0 for m in ("planned", "padded", "sdpa"))


def test_mixed_bench_smoke(api_model, tokenizer, tmp_path):
    from quiver.bench import mixed

    model_dir = _model_with_tokenizer(api_model, tokenizer, tmp_path)
    out = tmp_path / "results"
    # one decoder: its prompt is 64 tokens, inside the tiny model's 256-token context
    result = mixed.main(["--model", str(model_dir), "--decoders", "1", "--new-tokens", "12", "--prompt-tokens", "40",
                         "--arrivals", "1", "--threads", "1", "--out", str(out)])
    data = json.loads((out / "mixed.json").read_text())
    assert data == result and (data["device"], data["dtype"]) == ("cpu", auto_cpu_dtype())
    assert data["decode_steps"] > 0 and data["mixed_steps"] > 0


def test_roofline_bench_smoke(api_model, tokenizer, tmp_path):
    from quiver.bench import roofline

    model_dir = _model_with_tokenizer(api_model, tokenizer, tmp_path)
    out = tmp_path / "results"
    result = roofline.main(["--model", str(model_dir), "--batches", "2", "3", "--prompt-tokens", "8",
                            "--new-tokens", "4", "--peak-repeats", "1", "--dtype", "float32", "--out", str(out)])
    data = json.loads((out / "roofline.json").read_text())
    assert data["dtype"] == "float32" and data["matmul_peak_gflops"] > 0
    assert sorted(data["steps"]) == ["2", "3"] and sorted(result["steps"]) == [2, 3]
    for step in data["steps"].values():
        assert step["decode_ms"] > 0 and step["prefill_ms"] > 0
        assert abs(step["decode_share_of_peak"] - step["decode_gflops"] / data["matmul_peak_gflops"]) < 1e-9
        assert 0 < step["decode_projection_share"] < 1 and 0 <= step["decode_batched_matmul_share"] < 1
        assert step["decode_projection_share"] + step["decode_batched_matmul_share"] <= 1


def test_workload_bench_smoke(api_model, tokenizer, tmp_path):
    """The worker processes answer round by round, and every row and ratio lands in the JSON."""
    from quiver.bench import workload

    model_dir = _model_with_tokenizer(api_model, tokenizer, tmp_path)
    out = tmp_path / "results"
    workload.main(["--model", str(model_dir), "--dtypes", "float32", "--requests", "4", "--new-tokens", "3",
                   "--repeats", "2", "--threads", "1", "--out", str(out)])
    data = json.loads((out / "workload.json").read_text())
    assert [(r["engine"], r["mix"], r["dtype"]) for r in data["rows"]] == [
        ("quiver", "8 LoRA adapters", "float32"), ("quiver", "base only", "float32")]
    for r in data["rows"]:
        assert len(r["tokens_per_s"]) == 2 and all(t > 0 for t in r["tokens_per_s"]) and r["threads"] == 1
        assert r["vs_baseline_float32_lora"] is None
    lora, base = data["rows"]
    assert abs(lora["vs_base_only"] - lora["median_tokens_per_s"] / base["median_tokens_per_s"]) < 1e-9


def test_a_bench_without_out_writes_here_and_prints_only_its_own_lines(api_model, tokenizer, tmp_path):
    """`quiver bench NAME` with no --out writes to ./quiver-bench-results (never the checkout's published
    bench/results) and says so; transformers' progress bars and third-party warnings stay out of its output."""
    import subprocess
    import sys
    from pathlib import Path

    model_dir = _model_with_tokenizer(api_model, tokenizer, tmp_path)
    published = Path(__file__).parents[1] / "bench" / "results" / "throughput.json"
    before = published.read_bytes()
    try:
        done = subprocess.run([sys.executable, "-m", "quiver.bench", "throughput", "--model", str(model_dir),
                               "--concurrency", "1", "--new-tokens", "2", "--no-server"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=600)
    finally:
        rewritten = published.read_bytes() != before
        published.write_bytes(before)  # a failure here must not leave the published figures changed
    assert done.returncode == 0, done.stderr
    assert not rewritten
    written = tmp_path / "quiver-bench-results" / "throughput.json"
    assert [r["concurrency"] for r in json.loads(written.read_text())["rows"]] == [1]
    output = done.stdout + done.stderr
    assert f"wrote {written}\n" in output and "quiver bench throughput: done in " in output, output
    noise = [line for line in output.splitlines() if "\r" in line or "it/s]" in line or "Loading weights" in line
             or "Warning" in line or "warn" in line]
    assert not noise, noise


def test_quiet_third_party_silences_their_bars_logs_and_warnings():
    """What quiet_third_party keeps out, each made to speak in a fresh process: a transformers progress bar
    and warning, a FutureWarning from transformers, tqdm (the GGUF conversion's), bitsandbytes' CPU-kernel
    notice (logged on CPUs with AVX512-BF16); the bench's own print still comes through."""
    import subprocess
    import sys

    code = """if True:
        import warnings
        from quiver.bench.common import quiet_third_party
        quiet_third_party()
        import bitsandbytes.backends.cpu.ops
        from tqdm.auto import tqdm
        from transformers.utils import logging
        list(logging.tqdm(range(3), desc="Loading weights"))
        list(tqdm(range(3), desc="Converting and de-quantizing GGUF tensors"))
        logging.get_logger("transformers.modeling_utils").warning("a transformers warning")
        warnings.warn_explicit("a FutureWarning", FutureWarning, "modeling_utils.py", 1,
                               module="transformers.modeling_utils")
        print("the bench's own line")
    """
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("the bench's own line\n", "")
