"""The serving benchmark: its seeded schedule is right, and it runs end to end at tiny sizes against
a started `quiver serve` and against a running one (--url), writing sane JSON and a plot (no timing
asserted)."""
from __future__ import annotations

import itertools
import json
import random
import shutil
import socket
from collections import Counter

from helpers import auto_cpu_dtype


def _model_with_tokenizer(api_model, tokenizer, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(api_model[0], model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_poisson_arrivals_mean_gap():
    from quiver.bench.serving import arrival_times

    times = arrival_times(random.Random(0), 20_000, rate=4.0)
    assert all(b > a for a, b in itertools.pairwise(times))
    mean_gap = times[-1] / len(times)
    assert abs(mean_gap - 0.25) < 0.01
    assert arrival_times(random.Random(0), 3, float("inf")) == [0.0, 0.0, 0.0]


def test_adapter_choice_distributions():
    from quiver.bench.serving import choose_adapters, zipf_weights

    names = [f"a{i}" for i in range(8)]
    w = zipf_weights(8, 1.1)
    assert abs(sum(w) - 1) < 1e-12 and all(x > y for x, y in itertools.pairwise(w))
    assert abs(w[0] / w[1] - 2 ** 1.1) < 1e-9
    steep = Counter(choose_adapters(random.Random(1), names, 5000, "zipf", zipf_s=4.0))
    assert steep["a0"] / 5000 > 0.9
    zipf = Counter(choose_adapters(random.Random(1), names, 20_000, "zipf", zipf_s=1.1))
    assert abs(zipf["a0"] / 20_000 - w[0]) < 0.02 and zipf["a0"] > 3 * zipf["a7"]
    uniform = Counter(choose_adapters(random.Random(1), names, 20_000, "uniform"))
    assert set(uniform) == set(names) and all(abs(c / 20_000 - 1 / 8) < 0.02 for c in uniform.values())
    # same seed, same run
    assert choose_adapters(random.Random(7), names, 50, "zipf") == choose_adapters(random.Random(7), names, 50, "zipf")
    assert choose_adapters(random.Random(7), [], 3, "zipf") == [None, None, None]


def test_percentiles():
    from quiver.bench.common import percentiles

    p = percentiles([float(x) for x in range(1, 101)])
    assert p["p50"] == 50.5 and abs(p["p90"] - 90.1) < 1e-9 and abs(p["p99"] - 99.01) < 1e-9 and p["mean"] == 50.5
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None, "mean": None}


def _check(data, out, n, names):
    assert data["benchmark"] == "serving"
    assert data["errors"] == 0 and data["requests"] == n and data["completed"] == n
    assert data["duration_s"] > 0 and data["request_throughput"] > 0 and data["output_token_throughput"] > 0
    assert data["output_tokens"] == n * data["options"]["max_tokens"]
    for key in ("ttft_ms", "itl_ms", "e2e_ms"):
        p = data[key]
        assert 0 < p["p50"] <= p["p90"] <= p["p99"] and p["mean"] > 0
    assert data["ttft_ms"]["p50"] <= data["e2e_ms"]["p99"]
    assert sum(data["per_adapter"].values()) == n and set(data["per_adapter"]) <= set(names)
    assert len(data["per_request"]) == n and data["machine"]["cores"] >= 1
    assert (out / "serving.png").stat().st_size > 1000 and data["plot"] == str(out / "serving.png")


def test_serving_bench_smoke(api_model, tokenizer, tmp_path):
    from quiver.bench import serving

    model_dir = _model_with_tokenizer(api_model, tokenizer, tmp_path)
    out = tmp_path / "results"
    serving.main(["--model", str(model_dir), "--adapters", "2", "--rank", "4", "--requests", "6", "--rate", "20",
                  "--max-tokens", "4", "--prompt-tokens", "8", "--distribution", "zipf", "--port", str(_free_port()),
                  "--threads", "1", "--out", str(out)])
    data = json.loads((out / "serving.json").read_text())
    _check(data, out, 6, ["adapter0", "adapter1"])
    assert data["adapter_names"] == ["adapter0", "adapter1"] and data["options"]["distribution"] == "zipf"
    assert (data["device"], data["dtype"]) == ("cpu", auto_cpu_dtype())


def test_serving_bench_url(tiny_server, tmp_path):
    from quiver.bench import serving

    out = tmp_path / "results"
    serving.main(["--url", tiny_server.url, "--requests", "4", "--rate", "inf", "--max-tokens", "3",
                  "--prompt-tokens", "6", "--out", str(out)])
    data = json.loads((out / "serving.json").read_text())
    _check(data, out, 4, ["base"])
    assert data["per_adapter"] == {"base": 4} and data["model"] == "tiny"
    assert data["device"] is None and data["dtype"] is None  # someone else's server: not known here
