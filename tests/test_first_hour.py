"""What a new user meets first, said where they look: the dtype and what it means for exactness in the
start-up log, and `make serve` letting the API load adapters from outside the checkout."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch

from quiver.server.engine import device

ROOT = Path(__file__).resolve().parent.parent
INEXACT = "outputs may differ from float32 references and with batch composition; use --dtype float32 for exact, " \
          "batch-independent results"


def test_the_start_up_log_states_the_dtype_why_and_what_it_means(tmp_path, monkeypatch, caplog):
    (tmp_path / "config.json").write_text('{"torch_dtype": "bfloat16"}')
    cases = [("auto", "avx512_bf16", "cpu", f"dtype bfloat16 (auto: this CPU has avx512_bf16): {INEXACT}"),
             ("auto", None, "cpu", "dtype float32 (auto: this CPU has neither AVX512-BF16 nor AMX): outputs match "
                                   "float32 references (transformers, PEFT) and do not depend on batch composition"),
             ("float16", "amx_bf16", "cpu", f"dtype float16 (--dtype float16): {INEXACT}"),
             ("auto", None, "cuda", f"dtype bfloat16 (auto: the checkpoint's bfloat16 on a GPU): {INEXACT}")]
    for name, flag, kind, line in cases:
        monkeypatch.setattr(device, "cpu_bf16_flag", lambda flag=flag: flag)
        caplog.clear()
        with caplog.at_level("INFO", logger="quiver.server.engine.device"):
            device.resolve_dtype(name, torch.device(kind), tmp_path)
        assert [r.getMessage() for r in caplog.records] == [line]


def make_serve(tmp_path, *args: str) -> str:
    """The `quiver serve` command `make serve ARGS` runs (make -n: nothing runs), with HOME=tmp_path."""
    # --no-print-directory: under `make test`, a nested make would add "Leaving directory" to the output
    out = subprocess.run(["make", "--no-print-directory", "-n", "serve", *args], cwd=ROOT, capture_output=True,
                         text=True, check=True, env=os.environ | {"HOME": str(tmp_path)}).stdout
    return " ".join(out[out.index("/quiver serve"):].replace("\\\n", " ").split())


def test_make_serve_lets_the_api_load_adapters_from_home(tmp_path):
    assert f'--adapter-root "{tmp_path}"' in make_serve(tmp_path)
    assert '--adapter-root "/srv/adapters"' in make_serve(tmp_path, "ADAPTER_ROOT=/srv/adapters")
    # an --adapter-dir (the root's own default) or --adapter-root of the user's decides instead
    for flag in ("--adapter-dir", "--adapter-root"):
        cmd = make_serve(tmp_path, f"SERVE_ARGS={flag} /srv/x")
        assert cmd.count("--adapter-") == 1 and cmd.endswith(f"{flag} /srv/x"), cmd
