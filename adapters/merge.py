"""Offline merge: fold LoRA-family adapters into the base weights and write a plain HF model.

For each adapter i with weight w_i and each projection it targets, with the base W (never the
partly merged one): LoRA, rsLoRA, AdaLoRA: dW_i = s·B A (scale and AdaLoRA's E as at load);
DoRA: dW_i = g ⊙ (W + s·B A) − W with g = m / ‖W + s·B A‖ per output row (PEFT's merge).
The result is W' = W + Σ w_i dW_i — for several adapters, PEFT's `add_weighted_adapter`
with combination_type "cat".
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from server.lora_slots import module_shapes
from server.model_config import ModelConfig

from .errors import AdapterError
from .lora import load_lora
from .spec import detect_family

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def _key(layer: int, module: str) -> str:
    part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"model.layers.{layer}.{part}.{module}.weight"


def merge_adapters(model_dir: str | Path, adapters: list[tuple[str | Path, float]], out: str | Path,
                   dtype: torch.dtype = torch.float32, progress: bool = False) -> Path:
    model_dir, out = Path(model_dir), Path(out)
    if not adapters:
        raise AdapterError("nothing to merge: give at least one --adapter")
    for path, _ in adapters:  # refuse before reading or writing anything
        family = detect_family(path)
        if family != "lora":
            raise AdapterError(f"{path}: a {family} adapter cannot be merged into the base weights "
                               "(only LoRA, rsLoRA, DoRA and AdaLoRA can); serve it unmerged instead")
    if out.exists() and any(out.iterdir()):
        raise AdapterError(f"{out}: exists and is not empty")
    cfg = ModelConfig.from_dir(model_dir)
    tensors = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({k: f.get_tensor(k).float() for k in f.keys()})
    base = dict(tensors)  # every delta is taken against the original weights
    loaded = [(load_lora(f"adapter{i}", p, cfg.num_layers, module_shapes(cfg), lambda l, m: base[_key(l, m)],
                         max_rank=1 << 16), w) for i, (p, w) in enumerate(adapters)]
    layers = range(cfg.num_layers)
    if progress:
        from tqdm import tqdm
        layers = tqdm(layers, desc="merging", unit="layer")
    with torch.no_grad():
        for layer in layers:
            for adapter, weight in loaded:
                for (l, module), m in adapter.modules.items():
                    if l != layer:
                        continue
                    w0 = base[_key(l, module)]
                    delta = m.b @ m.a
                    if m.dora_scale is not None:  # b already carries g: g (W + sBA) - W = (g - 1) W + b a
                        delta = delta + (m.dora_scale[:, None] - 1) * w0
                    key = _key(l, module)
                    tensors[key] = tensors[key] + weight * delta
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for item in model_dir.iterdir():  # config, tokenizer, generation config...
        if item.is_file() and item.name not in WEIGHT_FILES and item.suffix != ".safetensors":
            shutil.copy2(item, tmp / item.name)
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    config = json.loads((tmp / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    lines = ["# Merged by quiver merge", "", f"base: {model_dir}", ""]
    lines += [f"- {p} (weight {w}, {a.spec.peft_type}{', DoRA' if a.uses_dora else ''}, rank {a.rank}, "
              f"targets {', '.join(a.targets)})" for (p, w), (a, _) in zip(adapters, loaded)]
    (tmp / "MERGED.md").write_text("\n".join(lines) + "\n")
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out
