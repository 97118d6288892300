"""The low-load benchmarks run end to end on a tiny random model and write sane JSON (no timing asserted); the
llama-server path is driven against a stand-in server that checks the command line and the requests."""
from __future__ import annotations

import json
import statistics
import sys
import textwrap

import pytest

from quiver.bench.llamacpp import request_body, server_command
from quiver.bench.lowload import parse, step_bytes

# A stand-in for llama-server: parses the flags bench.llamacpp passes, records them and every /completion body in
# $FAKE_LOG, answers /health and /completion (sleeping 1 ms per token, so t(n) - t(1) > 0).
FAKE = textwrap.dedent("""\
    #!{python}
    import argparse, json, os, time
    from http.server import BaseHTTPRequestHandler, HTTPServer
    ap = argparse.ArgumentParser()
    for flag in ("-m", "-np", "-c", "-t", "-tb", "--host", "--port", "--lora-scaled"):
        ap.add_argument(flag)
    ap.add_argument("--lora-init-without-apply", action="store_true")
    args = ap.parse_args()
    log = open(os.environ["FAKE_LOG"], "a")
    log.write(json.dumps({{"argv": vars(args)}}) + "\\n"); log.flush()
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a): pass
        def reply(self, obj):
            data = json.dumps(obj).encode()
            self.send_response(200); self.send_header("Content-Length", str(len(data))); self.end_headers()
            self.wfile.write(data)
        def do_GET(self):
            self.reply({{"status": "ok"}})
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            log.write(json.dumps({{"body": body}}) + "\\n"); log.flush()
            time.sleep(0.001 * body["n_predict"])
            self.reply({{"content": "x", "timings": {{"predicted_per_token_ms": 1.0}}}})
    HTTPServer((args.host, int(args.port)), H).serve_forever()
""")


def test_server_command_loads_the_lora_at_scale_0_and_a_request_says_its_scale():
    cmd = server_command("/opt/llama-server", "base.gguf", "lora.gguf", threads=2, port=8081)
    assert cmd == ["/opt/llama-server", "-m", "base.gguf", "-np", "1", "-c", "4096", "-t", "2", "-tb", "2",
                   "--host", "127.0.0.1", "--port", "8081", "--lora-scaled", "lora.gguf:0", "--lora-init-without-apply"]
    assert "--lora-scaled" not in server_command("s", "b.gguf", None, 1, 1)
    body = request_body([5, 6], 3, 0.0)
    assert body["lora"] == [{"id": 0, "scale": 0.0}] and body["cache_prompt"] is False and body["ignore_eos"]
    assert "lora" not in request_body([5], 3, None)


def test_llama_server_options_go_together(tmp_path, capsys):
    gguf = tmp_path / "base.gguf"
    gguf.write_text("")
    for argv in (["--llama-server", str(gguf)], ["--gguf", str(gguf)], ["--gguf-lora", str(gguf)],
                 ["--llama-server", str(tmp_path / "missing"), "--gguf", str(gguf)]):
        with pytest.raises(SystemExit):
            parse(argv)
    assert parse(["--llama-server", str(gguf), "--gguf", str(gguf)]).gguf == gguf
    with pytest.raises(SystemExit):  # llama.cpp's turns are taken at batch 1
        parse(["--llama-server", str(gguf), "--gguf", str(gguf), "--batches", "2", "4"])


def test_step_bytes_count_every_projection_and_the_lora():
    from types import SimpleNamespace
    mc = SimpleNamespace(hidden_size=4, head_dim=2, intermediate_size=8, num_heads=2, num_kv_heads=1, num_layers=3,
                         vocab_size=10)
    # q 4x4, k and v 4x2, o 4x4, gate and up 4x8, down 8x4, two norms of 4; head 10x4, final norm 4
    per_layer = 16 + 8 + 8 + 16 + 32 + 32 + 32 + 8
    assert step_bytes(mc, 2) == 2 * (3 * per_layer + 40 + 4)
    # rank 3: A [3, in] and B [out, 3] per projection, 3 layers: 3 * 3 * (8 + 6 + 6 + 8 + 12 + 12 + 12)
    assert step_bytes(mc, 2, rank=3) - step_bytes(mc, 2) == 2 * 3 * 3 * 64


def test_lowload_bench_smoke_with_a_stand_in_llama_server(tmp_path, monkeypatch):
    from quiver.bench import lowload

    fake, log = tmp_path / "llama-server", tmp_path / "fake.log"
    fake.write_text(FAKE.format(python=sys.executable))
    fake.chmod(0o755)
    (tmp_path / "base.gguf").write_text("")
    (tmp_path / "lora.gguf").write_text("")
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setattr(lowload, "PAUSE_S", 0.0)
    out = tmp_path / "results"
    lowload.main(["--model", "llama", "--batches", "1", "2", "--new-tokens", "4", "--repeats", "1", "--rank", "4",
                  "--threads", "1", "--bandwidth-mb", "8", "--bandwidth-repeats", "2", "--out", str(out),
                  "--llama-server", str(fake), "--gguf", str(tmp_path / "base.gguf"),
                  "--gguf-lora", str(tmp_path / "lora.gguf")])
    data = json.loads((out / "lowload.json").read_text())
    assert [(r["variant"], r["batch"]) for r in data["rows"]] == [("base", 1), ("lora r4", 1), ("base", 2),
                                                                   ("lora r4", 2)]
    base, lora = data["rows"][:2]
    assert lora["step_bytes"] > base["step_bytes"] and base["floor_ms"] > 0
    for r in data["rows"]:
        assert len(r["tpot_ms_all"]) == r["batch"] and r["tpot_ms"] > 0
        assert abs(r["tpot_vs_floor"] - r["tpot_ms"] / r["floor_ms"]) < 1e-9
    bw = data["bandwidth"]
    assert bw["floor_gb_per_s"] == max(bw["read_gb_per_s"], bw["projection_read_gb_per_s"] or 0) > 0
    assert data["threads"] == 1
    for r in data["rows"]:  # the floor is the step's bytes at the fastest read; by turn, at the probe before it
        assert r["floor_ms"] == pytest.approx(r["step_bytes"] / bw["floor_gb_per_s"] / 1e6)
        assert len(r["turn_gb_per_s"]) == 1 and r["turn_gb_per_s"][0] > 0
        turn_floor = r["step_bytes"] / r["turn_gb_per_s"][0] / 1e6
        assert r["tpot_vs_floor_by_turn"] == pytest.approx(statistics.median(r["tpot_ms_all"]) / turn_floor)
    peer = data["llama_server"]
    assert [r["variant"] for r in peer] == ["llama.cpp base", "llama.cpp lora r4"] and all(r["tpot_ms"] > 0 for r in peer)
    for mine, theirs in zip(data["rows"][:2], peer):  # one turn each (--repeats 1), their ratio beside them
        assert theirs["quiver_over_llama_by_turn"] == pytest.approx([mine["tpot_ms"] / theirs["tpot_ms"]])
        assert theirs["tpot_vs_floor_by_turn"] == pytest.approx(
            theirs["tpot_ms"] / (theirs["step_bytes"] / theirs["turn_gb_per_s"][0] / 1e6))
    assert peer[1]["quiver_over_llama_base_by_turn"] == pytest.approx([data["rows"][1]["tpot_ms"] / peer[0]["tpot_ms"]])
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    argv = lines[0]["argv"]
    assert (argv["m"], argv["t"], argv["np"]) == (str(tmp_path / "base.gguf"), "1", "1")
    assert argv["lora_scaled"] == f"{tmp_path / 'lora.gguf'}:0" and argv["lora_init_without_apply"]
    bodies = [line["body"] for line in lines[1:]]
    assert {b["lora"][0]["scale"] for b in bodies} == {0.0, 1.0}  # the base with the LoRA at 0, then the LoRA
    assert {b["n_predict"] for b in bodies} >= {1, 4}


def test_speculative_bench_smoke(tmp_path):
    from quiver.bench import speculative

    out = tmp_path / "results"
    speculative.main(["--model", "llama", "--k", "3", "--repeats", "1", "--paragraphs", "2", "--max-tokens", "12",
                      "--threads", "1", "--out", str(out)])
    data = json.loads((out / "speculative.json").read_text())
    assert data["dtype"] == "float32" and data["speculative_config"]["num_speculative_tokens"] == 3
    assert data["identical_outputs"] is True  # greedy in float32: speculation changes no token
    assert data["off"]["drafted"] == 0 and data["on"]["drafted"] >= data["on"]["accepted"]
    assert len(data["off"]["output_tokens"]) == len(data["on"]["output_tokens"]) == 2
    assert data["speedup"] > 0
