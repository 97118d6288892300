"""Draft-model speculation: a smaller model of the same tokenizer proposes each row's next K tokens greedily,
and the target verifies them in one step (speculate.verify: exact under greedy, distribution-preserving under
sampling, as for any proposal made without the target's draws).

A target adapter can have its own draft LoRA (`"draft_lora": {"adapter": "path"}`): the draft model with that
LoRA merged into a copy of its weights drafts for the adapter's rows, so an adapter that changes what the model
writes still gets drafts that agree with it. Rows of other adapters, and base rows, draft with the plain draft.

Each draft model keeps its own paged KV cache (the draft's K/V, the target's block manager untouched): a row gets
private blocks on its first draft, returned when its sequence is gone; the tokens whose K/V a row's blocks hold
are remembered, so a later call feeds only what changed (the verified tokens, after the longest prefix the
draft already saw). A row that cannot get blocks (the draft cache is full) decodes without drafts.
Rows draft one at a time: drafting is for steps of few rows, where a step is bound by reading the weights.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quiver.adapters.lora import load_lora
from quiver.server.engine.sequence import Sequence
from quiver.server.engine.step import RowLayout, StepHooks
from quiver.server.engine.upload import StepUpload
from quiver.server.model.config import ModelConfig
from quiver.server.model.fused import FusedLayers
from quiver.server.model.layout import module_shapes, slice_bounds
from quiver.server.model.llama import LlamaModel
from quiver.server.model.packed import PackedWeight

DRAFT_KV_ROWS = 4  # the draft cache holds this many rows of max_model_len tokens (more, shorter ones)


@dataclass
class DraftStep:
    """What LlamaModel.forward reads of a step, for one row of the draft."""
    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    attention: list
    hooks: StepHooks = field(default_factory=StepHooks)

    UPLOAD = ("input_ids", "positions", "slot_mapping", "attention")


@dataclass
class RowState:
    blocks: list[int] = field(default_factory=list)
    seen: list[int] = field(default_factory=list)  # tokens whose K/V the blocks hold, in order


def merge_lora(model: LlamaModel, path: str | Path) -> None:
    """W += scale · B A for every module of a plain LoRA (PEFT checkpoint) into the model's weights."""
    cfg = model.cfg
    adapter = load_lora("draft", path, cfg.num_layers, module_shapes(cfg), model.base_weight, max_rank=1 << 16)
    if adapter.uses_dora:
        raise ValueError(f"draft LoRA {path}: DoRA is not supported for a draft model; use a plain LoRA")
    for (layer, module), m in adapter.modules.items():
        group, lo, hi = slice_bounds(cfg, module)
        mod = model.layers[layer]
        weight = getattr(mod, group)
        dense = weight.dense() if isinstance(weight, PackedWeight) else weight.data
        if not isinstance(dense, torch.Tensor):
            raise ValueError("a draft model with a draft LoRA must be full precision, not 4-bit")
        dense[lo:hi] += (m.b.float() @ m.a.float()).to(dense.dtype)
        if isinstance(weight, PackedWeight):
            setattr(mod, group, PackedWeight(dense, model.huge_pages))
    model.fused = FusedLayers.of(model)  # it holds the weights it was made with


class DraftModel:
    """One draft model (the base draft, or the base draft with one draft LoRA merged) and its paged cache."""

    def __init__(self, model_dir: Path, lora: str | None, runner, num_blocks: int):
        self.model_config = mc = ModelConfig.from_dir(model_dir)
        with torch.device(runner.device):
            self.model = LlamaModel(mc, runner.ops, runner.dtype, runner.max_model_len,
                                    huge_pages=runner.model.huge_pages)
        self.model.load_weights(model_dir)
        self.model.eval()
        if lora is not None:
            merge_lora(self.model, lora)
        self.ops, self.block_size, self.device = runner.ops, runner.block_size, runner.device
        self.upload = StepUpload(runner.device)
        shape = (mc.num_kv_heads, num_blocks, self.block_size, mc.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=runner.dtype, device=runner.device),
                           torch.zeros(shape, dtype=runner.dtype, device=runner.device)) for _ in range(mc.num_layers)]
        self.free = list(range(num_blocks))
        self.rows: dict[str, RowState] = {}

    def propose(self, seq: Sequence, tokens: list[int], k: int) -> list[int]:
        """The draft's greedy continuation of `tokens` (the row's real tokens), k tokens."""
        state = self.rows.get(seq.request_id)
        if state is None:
            state = self.rows[seq.request_id] = RowState()
            weakref.finalize(seq, self._release, seq.request_id)
        keep = 0
        limit = min(len(state.seen), len(tokens) - 1)  # the last token is always fed: its logits draw the first draft
        while keep < limit and state.seen[keep] == tokens[keep]:
            keep += 1
        del state.seen[keep:]
        drafts: list[int] = []
        new = tokens[keep:]
        for _ in range(k):
            if not self._reserve(state, len(state.seen) + len(new)):
                break
            token = self._next_token(state, new)
            state.seen += new
            drafts.append(token)
            new = [token]
        return drafts

    @torch.inference_mode()
    def _next_token(self, state: RowState, new: list[int]) -> int:
        start, n, bs = len(state.seen), len(new), self.block_size
        table = torch.tensor([state.blocks], dtype=torch.long)
        positions = torch.arange(start, start + n)
        layout = RowLayout(torch.tensor([start]), torch.tensor([n]), torch.tensor([0]), torch.tensor([0]),
                           torch.tensor([0]), table, bs, n)
        mc = self.model_config
        step = DraftStep(torch.tensor(new), positions, table[0, positions // bs] * bs + positions % bs,
                         self.ops.attention_meta(layout, mc.num_heads // mc.num_kv_heads, self.model.window_sizes))
        self.upload.send(step)
        hidden = self.model(step, self.kv_caches)
        return int(self.model.logits(hidden[-1:]).argmax(dim=-1).item())

    def _reserve(self, state: RowState, tokens: int) -> bool:
        """Blocks for `tokens` K/V entries (new ones zeroed), or False when the cache has no room."""
        need = -(-tokens // self.block_size) - len(state.blocks)
        if need <= 0:
            return True
        if need > len(self.free):
            return False
        fresh = [self.free.pop() for _ in range(need)]
        blocks = torch.tensor(fresh, device=self.device)
        for k_cache, v_cache in self.kv_caches:
            self.ops.zero_blocks(k_cache, v_cache, blocks)
        state.blocks += fresh
        return True

    def _release(self, request_id: str) -> None:
        state = self.rows.pop(request_id, None)
        if state is not None:
            self.free += state.blocks


class DraftModels:
    """The draft for each row: its adapter's draft LoRA model where one is configured, else the base draft."""

    def __init__(self, config, runner):
        model_dir = Path(config.model)
        if not (model_dir / "config.json").is_file():
            raise ValueError(f"--speculative-config: the draft model {config.model!r} is not a model folder")
        mc = ModelConfig.from_dir(model_dir)
        if mc.vocab_size != runner.model_config.vocab_size:
            raise ValueError(f"--speculative-config: the draft model's vocabulary ({mc.vocab_size} tokens) is not the "
                             f"target's ({runner.model_config.vocab_size}): a draft must share the tokenizer")
        blocks = DRAFT_KV_ROWS * -(-runner.max_model_len // runner.block_size)
        self.base = DraftModel(model_dir, None, runner, blocks)
        self.by_adapter = {name: DraftModel(model_dir, path, runner, blocks) for name, path in config.draft_lora.items()}

    def for_row(self, seq: Sequence) -> DraftModel:
        return self.by_adapter.get(seq.adapter, self.base)
