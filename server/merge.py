"""Offline merge: fold LoRA-family adapters into the base weights and write a plain HF model.

The adapters are first combined into one (adapters/combine.py: "cat" is the exact weighted sum,
TIES/DARE/... as PEFT's `add_weighted_adapter`), every delta taken against the original
weights. Per module W' = W + b'a' + (g' - 1)·W, the last term for DoRA only:
g ⊙ (W + sBA) - W with g = m / ‖W + sBA‖ per output row, which is PEFT's DoRA merge.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from quiver.adapters.combine import combine
from quiver.adapters.errors import AdapterError
from quiver.adapters.lora import LoraAdapter, load_lora
from quiver.adapters.spec import detect_family

from quiver.server.model.checkpoint import CONVERTED_MARK, Checkpoint
from quiver.server.model.config import ModelConfig
from quiver.server.model.fourbit import read_dequantized
from quiver.server.model.layout import module_shapes

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
CHECK_PROMPTS = ("The capital of France is", "def fibonacci(n):",
                 "Write a haiku about the sea.", "1, 2, 3, 5, 8, 13,")


def _key(layer: int, module: str) -> str:
    part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj") else "mlp"  # Phi-3 fuses qkv
    return f"model.layers.{layer}.{part}.{module}.weight"


def _refuse_unmergeable(adapters: list[tuple[str | Path, float]]) -> None:
    if not adapters:
        raise AdapterError("nothing to merge: give at least one --adapter")
    for path, _ in adapters:
        family = detect_family(path)
        if family != "lora":
            raise AdapterError(f"{path}: a {family} adapter cannot be merged into the base weights "
                               "(only LoRA, rsLoRA, DoRA and AdaLoRA can); serve it unmerged instead")


def _read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """fp32, a bitsandbytes 4-bit base dequantized: the merged model is a plain one."""
    return read_dequantized(Checkpoint(model_dir))


def combined_adapter(name: str, adapters: list[tuple[str | Path, float]], num_layers: int, shapes: dict,
                     base_weight, combination: str = "cat", density: float | None = None,
                     majority_sign: str = "total", seed: int = 0) -> LoraAdapter:
    """Read the adapters and combine them into one LoraAdapter (merged, or served unmerged by --check)."""
    _refuse_unmergeable(adapters)
    loaded = [(load_lora(f"adapter{i}", p, num_layers, shapes, base_weight, max_rank=1 << 16), w)
              for i, (p, w) in enumerate(adapters)]
    modules = combine(loaded, combination, density, majority_sign, seed)
    return LoraAdapter(name=name, spec=loaded[0][0].spec, modules=modules)


def merge_adapters(model_dir: str | Path, adapters: list[tuple[str | Path, float]], out: str | Path,
                   dtype: torch.dtype = torch.float32, combination: str = "cat", density: float | None = None,
                   majority_sign: str = "total", seed: int = 0, progress: bool = False) -> Path:
    model_dir, out = Path(model_dir), Path(out)
    _refuse_unmergeable(adapters)  # before anything is read or written
    if out.exists() and any(out.iterdir()):
        raise AdapterError(f"{out}: exists and is not empty")
    cfg = ModelConfig.from_dir(model_dir)
    tensors = _read_weights(model_dir)
    mix = combined_adapter("merged", adapters, cfg.num_layers, module_shapes(cfg), lambda l, m: tensors[_key(l, m)],
                           combination, density, majority_sign, seed)
    layers = range(cfg.num_layers)
    if progress:
        from tqdm import tqdm
        layers = tqdm(layers, desc="merging", unit="layer")
    by_layer: dict[int, list] = {}
    for (layer, module), m in mix.modules.items():
        by_layer.setdefault(layer, []).append((module, m))
    with torch.no_grad():
        for layer in layers:
            for module, m in by_layer.get(layer, ()):
                w = tensors[_key(layer, module)]
                delta = m.b @ m.a
                if m.dora_scale is not None:
                    delta += (m.dora_scale[:, None] - 1) * w
                tensors[_key(layer, module)] = w + delta
    _write(model_dir, out, tensors, dtype, _note(model_dir, adapters, mix, combination, density, majority_sign,
                                                 seed))
    return out


def _note(model_dir, adapters, mix, combination, density, majority_sign, seed) -> str:
    how = combination if len(adapters) > 1 else "single adapter"
    if combination in ("ties", "dare_linear", "dare_ties", "magnitude_prune") and len(adapters) > 1:
        how += f", density {density}" + (f", majority sign {majority_sign}" if "ties" in combination else "")
        how += f", seed {seed}" if combination.startswith("dare") else ""
    lines = ["# Merged by quiver merge", "", f"base: {model_dir}", f"combination: {how}",
             f"targets: {', '.join(mix.targets)}", ""]
    lines += [f"- {p} (weight {w})" for p, w in adapters]
    return "\n".join(lines) + "\n"


def _write(model_dir: Path, out: Path, tensors: dict, dtype: torch.dtype, note: str) -> None:
    """Into a temporary sibling first, renamed at the end: a failed merge leaves no half model."""
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for item in model_dir.iterdir():  # config, tokenizer, generation config...
            if item.is_file() and item.name not in WEIGHT_FILES and item.suffix != ".safetensors" \
                    and item.name != CONVERTED_MARK:
                shutil.copy2(item, tmp / item.name)
        save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        config = json.loads((tmp / "config.json").read_text())
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("quantization_config", None)  # a 4-bit base is written back dequantized
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "MERGED.md").write_text(note)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_merge(model_dir: str | Path, merged_dir: str | Path, adapters: list[tuple[str | Path, float]],
                dtype: str = "float32", prompts: tuple[str | list[int], ...] = CHECK_PROMPTS, tokenizer=None,
                **combination) -> float:
    """Max |logit difference| between the merged model and the base serving the same combination
    unmerged (read again through the engine's own adapter loader), at the last position of each prompt."""
    from quiver.server.engine.config import EngineConfig
    from quiver.server.engine.llm_engine import LLMEngine

    if tokenizer is None:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ids = [tokenizer(p).input_ids if isinstance(p, str) else p for p in prompts]

    def engine(model, max_rank=1):
        return LLMEngine(EngineConfig(model=str(model), dtype=dtype, max_lora_rank=max_rank, max_loras=1,
                                      max_model_len=max(map(len, ids)) + 1, kv_cache_memory_mb=64),
                         tokenizer=tokenizer)

    merged = engine(merged_dir)
    theirs = _final_logits(merged, ids)
    del merged
    model_dir = Path(model_dir)
    mc, weights = ModelConfig.from_dir(model_dir), _read_weights(model_dir)
    mix = combined_adapter("unmerged", adapters, mc.num_layers, module_shapes(mc), lambda l, m: weights[_key(l, m)],
                           **combination)
    base = engine(model_dir, max_rank=mix.rank)
    base.adopt_adapter(mix, "lora", str(mix.spec.path))
    ours = _final_logits(base, ids, "unmerged")
    return max((a - b).abs().max().item() for a, b in zip(ours, theirs))


def _final_logits(engine, prompts: list[list[int]], adapter: str | None = None) -> list[torch.Tensor]:
    """The logits each prompt's first output token is drawn from, through the engine's own step."""
    from quiver.server.engine.sampling import SamplingParams

    seen = []
    observe = lambda step, logits: seen.append(logits)  # noqa: E731
    engine.observers.append(observe)
    try:
        out = []
        for i, ids in enumerate(prompts):
            engine.add_request(ids, SamplingParams(max_tokens=1, temperature=0), adapter=adapter,
                               request_id=f"check{i}")
            while engine.has_work():
                engine.step()
            out.append(seen[-1][0].float())
        return out
    finally:
        engine.observers.remove(observe)
