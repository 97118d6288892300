"""Compile the Triton kernels before the server takes requests, not on its first ones: a prefill of
several blocks and a decode step through the model (attention, the 4-bit dequantization where the base
is 4-bit), then each LoRA form (segmented for prefill, gathered for decode) on scratch slots of every
fused projection's shape. The kernels specialise on dtype and tile constants only (lengths and strides
that vary per step are not specialised), so these launches compile what serving will run. Triton keeps
the compiled kernels in its cache folder (TRITON_CACHE_DIR), so a restart on the same disk only loads them."""
from __future__ import annotations

import logging
import time

import torch

from quiver.server.engine.sampling import SamplingParams
from quiver.server.engine.upload import StepUpload

log = logging.getLogger(__name__)


def lora_shapes(mc) -> list[tuple[int, list[int]]]:
    """(in features, slice widths) of each fused LoRA projection: q/k/v, o, gate/up, down."""
    h, d = mc.hidden_size, mc.head_dim
    return [(h, [mc.num_heads * d, mc.num_kv_heads * d, mc.num_kv_heads * d]), (mc.num_heads * d, [h]),
            (h, [mc.intermediate_size] * 2), (mc.intermediate_size, [h])]


@torch.inference_mode()
def warm_up(engine) -> float:
    """Run the Triton engine's kernels once each, and the compiled decoder layers' two graphs (a prefill and
    a decode step: server.model.compiled); seconds taken (0 where neither is there). The engine is left as it
    was: the warm-up request is finished and its blocks are free."""
    runner = engine.runner
    ops, mc, device, dtype = runner.ops, runner.model_config, runner.device, runner.dtype
    if ops.name != "triton" and runner.model.compiled is None:
        return 0.0
    t0 = time.perf_counter()
    prompt = [(3 + i) % mc.vocab_size for i in range(2 * engine.blocks.block_size + 1)]
    engine.add_request(prompt, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True), request_id="warm-up")
    while engine.has_work():
        engine.step()
    if ops.name != "triton":
        log.info("decoder layers compiled (or loaded from the inductor cache) in %.1f s", time.perf_counter() - t0)
        return time.perf_counter() - t0
    upload = StepUpload(device)
    for in_features, outs in lora_shapes(mc):
        buf = ops.lora_buffers(1, engine.config.max_lora_rank, in_features, outs, dtype, device)
        for tokens in (64, 1):  # one adapter's 64 tokens (several row tiles) take SGMV, a single token BGMV
            meta = ops.lora_meta(torch.zeros(tokens, dtype=torch.long))
            upload.send(meta)
            x = torch.zeros(tokens, in_features, dtype=dtype, device=device)
            ops.lora_apply(x, torch.zeros(tokens, sum(outs), dtype=dtype, device=device), buf, meta)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    took = time.perf_counter() - t0
    log.info("Triton kernels compiled (or loaded from the cache) in %.1f s", took)
    return took
