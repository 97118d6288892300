"""Owns the model weights, the kernel ops and the paged KV cache; runs one forward step for a batch."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quiver.kernels.ops import ops_for
from quiver.server.engine.config import EngineConfig
from quiver.server.engine.sampler import SampleResult, sample, top_logprobs
from quiver.server.engine.sequence import Sequence, TokenLogprob
from quiver.server.engine.step_inputs import StepInputs, build_step
from quiver.server.families.base import StepRows
from quiver.server.model.config import ModelConfig
from quiver.server.model.hooks import StepHooks
from quiver.server.model.llama import LlamaModel

log = logging.getLogger(__name__)

MAX_DEFAULT_MODEL_LEN = 8192


@dataclass
class StepOutcome:
    sampled: list[Sequence] = field(default_factory=list)  # rows that drew a token, in result order
    result: SampleResult | None = None
    non_finite: list[Sequence] = field(default_factory=list)  # rows whose logits were NaN or Inf


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir: Path):
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        elif config.device == "cpu":
            torch.set_num_threads(len(os.sched_getaffinity(0)))
        self.device = torch.device(config.device)
        self.dtype = getattr(torch, config.dtype)
        self.model_config = ModelConfig.from_dir(model_dir)
        mc = self.model_config
        limit = min(mc.max_position_embeddings, MAX_DEFAULT_MODEL_LEN)
        if mc.sliding_window:
            limit = min(limit, mc.sliding_window)  # inside the window, full attention is exact
        self.max_model_len = config.max_model_len or limit
        if self.max_model_len > limit:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds what this model supports ({limit}: "
                             "max_position_embeddings, and the sliding window where there is one)")
        self.ops = ops_for(self.device, config.kernels)
        with torch.device(self.device):
            self.model = LlamaModel(mc, self.ops, self.dtype, self.max_model_len)
        self.model.load_weights(model_dir)
        self.model.eval()
        self.block_size = config.block_size
        self.num_blocks = config.num_kv_blocks or self._blocks_for_memory(config.kv_cache_memory_mb)
        if self.num_blocks * self.block_size < self.max_model_len:
            raise ValueError(f"the KV cache ({self.num_blocks} blocks of {self.block_size}) cannot hold one "
                             f"sequence of max_model_len={self.max_model_len}; give more blocks or a smaller max_model_len")
        # one block more than the block manager hands out: it stays zero, and padded block tables point at it
        shape = (mc.num_kv_heads, self.num_blocks + 1, self.block_size, mc.head_dim)
        self.pad_block = self.num_blocks
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in range(mc.num_layers)]
        self.observers: list[Callable[[StepInputs, torch.Tensor | None], None]] = []  # see step()
        log.info("model loaded: %d layers, KV cache %d blocks x %d tokens, max_model_len %d",
                 mc.num_layers, self.num_blocks, self.block_size, self.max_model_len)

    def _blocks_for_memory(self, mb: int) -> int:
        mc = self.model_config
        per_block = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * self.block_size * self.dtype.itemsize
        return max(1, mb * 2**20 // per_block)

    @torch.inference_mode()
    def zero_blocks(self, blocks: list[int]) -> None:
        """Blocks just handed out start empty: nothing of a former owner (even NaN) can be read from them."""
        if blocks:
            index = torch.tensor(blocks, device=self.device)
            for k_cache, v_cache in self.kv_caches:
                self.ops.zero_blocks(k_cache, v_cache, index)

    @torch.inference_mode()
    def step(self, rows: list[tuple[Sequence, int]], step_hooks: Callable[[StepRows], StepHooks]) -> StepOutcome:
        """Run one forward pass; record prompt logprobs; sample the rows that need a token.

        step_hooks gives the adapter families' hooks for the step's rows. Each observer sees the
        step's inputs and the logits it computed for the rows of inp.logits_index (None if none),
        before sampling. A row with a non-finite logit is neither recorded nor sampled."""
        # rows grouped by adapter: each adapter's tokens are contiguous
        rows = sorted(rows, key=lambda row: row[0].binding.sort_key if row[0].binding is not None else (-1, -1))
        inp = build_step(rows, self.block_size, self.device, self.ops.attention_layout, self.pad_block)
        inp.hooks = step_hooks(inp.rows)
        hidden = self.model(inp, self.kv_caches)
        logits = self.model.logits(hidden.index_select(0, inp.logits_index)) if inp.logits_index.numel() else None
        for observe in self.observers:
            observe(inp, logits)
        if logits is None:
            return StepOutcome()
        finite = torch.isfinite(logits).all(dim=1)
        bad = set() if bool(finite.all()) else {inp.logits_rows[i] for i in (~finite).nonzero().squeeze(1).tolist()}
        for row, first, count in inp.prompt_logprob_spans:
            if row not in bad:
                self._record_prompt_logprobs(rows[row][0], logits[first:first + count], rows[row][0].num_computed)
        picked = [(r, pos) for r, pos in zip(inp.sample_rows, inp.sample_logits_pos.tolist()) if r not in bad]
        seqs = [rows[r][0] for r, _ in picked]
        result = None
        if seqs:
            positions = inp.sample_logits_pos if not bad else torch.tensor([pos for _, pos in picked], device=logits.device)
            result = sample(logits.index_select(0, positions), seqs)
        return StepOutcome(seqs, result, [rows[r][0] for r in sorted(bad)])

    @staticmethod
    def _record_prompt_logprobs(seq: Sequence, logits: torch.Tensor, start: int) -> None:
        """The logits at position p predict prompt token p + 1, stored at index p + 1
        (index 0, the first token, has none). Positions already stored (recompute after a
        preemption) are skipped."""
        if not seq.prompt_logprobs:
            seq.prompt_logprobs.append(None)
        nv = seq.num_virtual  # soft-prompt placeholders come first and have no entries
        first = nv + len(seq.prompt_logprobs) - 1  # first position still owed
        lo, hi = max(first, start), min(start + logits.shape[0], nv + seq.num_prompt_tokens - 1)
        if lo >= hi:
            return
        lp = torch.log_softmax(logits[lo - start:hi - start], dim=-1)
        targets = torch.tensor(seq.token_ids[lo + 1:hi + 1], device=lp.device)
        chosen = lp.gather(1, targets[:, None]).squeeze(1).tolist()
        for tok, c, top in zip(targets.tolist(), chosen, top_logprobs(lp, seq.params.prompt_logprobs)):
            seq.prompt_logprobs.append(TokenLogprob(tok, c, top))
