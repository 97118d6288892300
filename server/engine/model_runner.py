"""Owns the model weights, the kernel ops and the paged KV cache; runs one forward step for a batch."""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quiver.kernels.ops import ops_for
from quiver.server.engine.config import EngineConfig
from quiver.server.engine.device import allocated, kv_cache_blocks, make_current, resolve_device, resolve_dtype
from quiver.server.engine.sampler import SampleResult, sample, top_logprobs
from quiver.server.engine.sequence import Sequence, TokenLogprob
from quiver.server.engine.step import Step
from quiver.server.engine.upload import StepUpload
from quiver.server.model.compiled import compile_layers
from quiver.server.model.config import ModelConfig
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
        self.device = resolve_device(config.device)
        make_current(self.device)
        self.dtype = resolve_dtype(config.dtype, self.device, model_dir)
        self.model_config = ModelConfig.from_dir(model_dir)
        mc = self.model_config
        limit = min(mc.max_position_embeddings, MAX_DEFAULT_MODEL_LEN)
        self.max_model_len = config.max_model_len or limit
        if self.max_model_len > mc.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds what this model supports "
                             f"(max_position_embeddings {mc.max_position_embeddings})")
        self.ops = ops_for(self.device, config.kernels)
        if config.quantization and mc.quantization and config.quantization != mc.quantization:
            raise ValueError(f"--quantization {config.quantization}: the checkpoint is already {mc.quantization}")
        self.quantization = mc.quantization or config.quantization  # None: full-precision projections
        before = allocated(self.device)
        with torch.device(self.device):
            self.model = LlamaModel(mc, self.ops, self.dtype, self.max_model_len,
                                    quantization=None if mc.quantization else config.quantization,
                                    double_quant=config.double_quant, quantize_embeddings=config.quantize_embeddings,
                                    huge_pages=config.huge_pages)
        self.model.load_weights(model_dir)
        self.model.eval()
        if not config.enforce_eager and self.device.type == "cpu":
            self.model.compiled = compile_layers(self.model)
        self.block_size = config.block_size
        self.num_blocks = kv_cache_blocks(config, mc, self.dtype, self.device, allocated(self.device) - before)
        if self.num_blocks * self.block_size < self.max_model_len:
            raise ValueError(f"the KV cache ({self.num_blocks} blocks of {self.block_size} tokens) cannot hold one "
                             f"sequence of max_model_len={self.max_model_len}: give it more memory (--kv-cache-memory-mb, "
                             "--num-kv-blocks, or on a GPU --gpu-memory-utilization) or a smaller --max-model-len")
        # one block more than the block manager hands out: it stays zero, and padded block tables point at it
        shape = (mc.num_kv_heads, self.num_blocks + 1, self.block_size, mc.head_dim)
        self.pad_block = self.num_blocks
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in range(mc.num_layers)]
        self.upload = StepUpload(self.device)  # the step's host tensors, one copy to the device per step
        self.observers: list[Callable[[Step, torch.Tensor | None], None]] = []  # see run()
        log.info("model loaded: %d layers, KV cache %d blocks x %d tokens, max_model_len %d",
                 mc.num_layers, self.num_blocks, self.block_size, self.max_model_len)

    def bind_thread(self) -> None:
        """Make this engine's device current on the calling thread (the one that steps it)."""
        make_current(self.device)

    @torch.inference_mode()
    def run(self, step: Step) -> StepOutcome:
        """Run one forward pass; record prompt logprobs; sample the rows that need a token.

        The op backend adds its attention metadata; the step's host tensors reach the device in one copy,
        and sampled tokens come back in one. The step's fresh blocks are zeroed before the forward writes
        (nothing of a former owner, even NaN, can be read from them). Each observer sees the step and the
        logits it computed for step.logits_index (None if none), before sampling. A row with a non-finite
        logit is neither recorded nor sampled."""
        mc = self.model_config
        step.attention = self.ops.attention_meta(step.layout, mc.num_heads // mc.num_kv_heads, self.model.window_sizes)
        self.upload.send(step)
        if step.fresh_blocks.numel():
            for k_cache, v_cache in self.kv_caches:
                self.ops.zero_blocks(k_cache, v_cache, step.fresh_blocks)
        step.zeroed = True
        hidden = self.model(step, self.kv_caches)
        n = step.logits_index.numel()  # logits_index ascends: n == T is every token (a decode step), no gather
        logits = self.model.logits(hidden if n == hidden.shape[0] else hidden.index_select(0, step.logits_index)) \
            if n else None
        for observe in self.observers:
            observe(step, logits)
        if logits is None:
            return StepOutcome()
        bad = {}  # request id -> sequence, for rows whose logits are not finite
        for seq, first, count in step.prompt_logprob_spans:
            if not self._record_prompt_logprobs(seq, logits[first:first + count], seq.num_computed):
                bad[seq.request_id] = seq
        seqs, batch = step.sampled, step.sampling
        if not seqs:
            return StepOutcome(non_finite=list(bad.values()))
        # sample adjusts its logits in place: they go as they are only when every row is sampled and none adjusted
        as_is = batch.adjust is None and len(seqs) == logits.shape[0]
        result = sample(logits if as_is else logits.index_select(0, step.sample_index), batch)
        bad.update({seq.request_id: seq for seq, ok in zip(seqs, result.finite) if not ok})
        if not bad:
            return StepOutcome(seqs, result)
        keep = [i for i, seq in enumerate(seqs) if seq.request_id not in bad]
        result = SampleResult([result.tokens[i] for i in keep], [True] * len(keep),
                              None if result.logprobs is None else [result.logprobs[i] for i in keep],
                              None if result.top is None else [result.top[i] for i in keep])
        return StepOutcome([seqs[i] for i in keep], result, list(bad.values()))

    @staticmethod
    def _record_prompt_logprobs(seq: Sequence, logits: torch.Tensor, start: int) -> bool:
        """The logits at position p predict prompt token p + 1, stored at index p + 1
        (index 0, the first token, has none). Positions already stored (recompute after a
        preemption) are skipped. False (nothing recorded) when they are not finite."""
        if not seq.prompt_logprobs:
            seq.prompt_logprobs.append(None)
        nv = seq.num_virtual  # soft-prompt placeholders come first and have no entries
        first = nv + len(seq.prompt_logprobs) - 1  # first position still owed
        lo, hi = max(first, start), min(start + logits.shape[0], nv + seq.num_prompt_tokens - 1)
        if lo >= hi:
            return True
        lp = torch.log_softmax(logits[lo - start:hi - start], dim=-1)
        targets = torch.tensor(seq.token_ids[lo + 1:hi + 1], device=lp.device)
        chosen = lp.gather(1, targets[:, None]).squeeze(1).tolist()
        if not all(math.isfinite(c) for c in chosen):
            return False
        for tok, c, top in zip(targets.tolist(), chosen, top_logprobs(lp, seq.params.prompt_logprobs)):
            seq.prompt_logprobs.append(TokenLogprob(tok, c, top))
        return True
