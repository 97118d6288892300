"""The Quiver-vs-PEFT benchmark runs end to end at tiny sizes and writes sane JSON and a plot
(no timing asserted)."""
from __future__ import annotations

import json

from helpers import auto_cpu_dtype
from test_bench_smoke import _model_with_tokenizer


def test_peft_bench_smoke(api_model, tokenizer, tmp_path):
    from quiver.bench import peft

    model_dir = _model_with_tokenizer(api_model, tokenizer, tmp_path)
    out = tmp_path / "results"
    result = peft.main(["--model", str(model_dir), "--adapters", "1", "2", "--batch", "4", "--new-tokens", "3",
                        "--rank", "4", "--out", str(out)])
    data = json.loads((out / "peft.json").read_text())
    assert data["benchmark"] == "peft"
    assert (data["batch"], data["new_tokens"], data["rank"]) == (4, 3, 4)
    assert [r["distinct_adapters"] for r in data["rows"]] == [1, 2]
    for row in data["rows"]:
        q, mixed, per = (row["quiver_tokens_per_s"], row["peft_mixed_tokens_per_s"],
                         row["peft_per_adapter_tokens_per_s"])
        assert q > 0 and mixed > 0 and per > 0
        assert abs(row["quiver_vs_peft_mixed"] - q / mixed) < 1e-9
        assert abs(row["quiver_vs_peft_per_adapter"] - q / per) < 1e-9
    assert data["machine"]["cores"] >= 1 and data["threads"] >= 1
    assert (data["device"], data["dtype"]) == ("cpu", auto_cpu_dtype())
    assert data["plot"] == result["plot"] == str(out / "peft.png")
    assert (out / "peft.png").stat().st_size > 1000
