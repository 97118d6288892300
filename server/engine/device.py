"""The one place that decides where the engine runs: the device (checked to exist, made current for
Triton's launches), the dtype `auto` resolves to, and how many KV-cache blocks fit.

On a GPU the KV cache takes what this engine's weights, LoRA slots and working reserve leave of
--gpu-memory-utilization x the device's memory, as vLLM sizes it (other engines' memory only caps it by
what is free); on the CPU it is
--kv-cache-memory-mb (512 MiB unless given).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)
CPU_KV_CACHE_MB = 512
MiB = 2**20


def resolve_device(name: str) -> torch.device:
    """The device `name` names, checked: a clear ValueError when torch cannot use it."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:  # e.g. 'cuda:x'
        raise ValueError(f"--device {name}: {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this torch sees no CUDA device (torch {torch.__version__}, "
                             f"CUDA build: {torch.version.cuda or 'no'})")
        count = torch.cuda.device_count()
        if (device.index or 0) >= count:
            raise ValueError(f"--device {name}: there {'is' if count == 1 else 'are'} only {count} CUDA device(s)")
        device = torch.device("cuda", device.index or 0)
    return device


def make_current(device: torch.device) -> None:
    """Triton launches on the thread's current CUDA device, not the tensors': make `device` current
    (call once per thread that steps the engine)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with bfloat16 matmul instructions


def cpu_bf16_flag(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The flag by which this CPU computes bfloat16 matmuls natively (AVX512-BF16 or AMX), or None
    (no such flag, or no /proc/cpuinfo to read)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return next((f for f in BF16_CPU_FLAGS if f in flags), None)
    return None


def resolve_dtype(name: str, device: torch.device, model_dir: Path) -> torch.dtype:
    """`auto`: on a GPU the checkpoint's own dtype (bf16 for most models, float32 kept); on a CPU with
    bfloat16 matmul instructions bfloat16 (its matmuls run at twice float32's rate, and a decode step
    reads half the bytes), elsewhere float32. Logged once, with the reason and what it means for exactness:
    a 16-bit dtype rounds differently from float32 references, and with how a batch is made up."""
    dtype, why = _choose_dtype(name, device, model_dir)
    short = str(dtype).removeprefix("torch.")
    if dtype == torch.float32:
        log.info("dtype float32 (%s): outputs match float32 references (transformers, PEFT) and do not depend on "
                 "batch composition", why)
    else:
        log.info("dtype %s (%s): outputs may differ from float32 references and with batch composition; use "
                 "--dtype float32 for exact, batch-independent results", short, why)
    return dtype


def _choose_dtype(name: str, device: torch.device, model_dir: Path) -> tuple[torch.dtype, str]:
    """(dtype, why) for --dtype `name`."""
    if name != "auto":
        return getattr(torch, name), f"--dtype {name}"
    if device.type != "cuda":
        flag = cpu_bf16_flag()
        return ((torch.bfloat16, f"auto: this CPU has {flag}") if flag else
                (torch.float32, "auto: this CPU has neither AVX512-BF16 nor AMX"))
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    stored = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(str(stored), torch.float32)
    return dtype, f"auto: the checkpoint's {stored} on a GPU"


def kv_block_bytes(mc, block_size: int, dtype: torch.dtype) -> int:
    return 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * block_size * dtype.itemsize


def lora_slot_bytes(mc, max_loras: int, max_rank: int, dtype: torch.dtype) -> int:
    """What the LoRA family's device slots take (allocated with the first adapter)."""
    if max_loras == 0:
        return 0
    h, d, inter = mc.hidden_size, mc.head_dim, mc.intermediate_size
    qkv, o = (mc.num_heads + 2 * mc.num_kv_heads) * d, mc.num_heads * d
    per_layer = sum(s * max_rank * n_in + s * max_rank * n_out + n_out  # a, b (block-diagonal at most), g - 1
                    for s, n_in, n_out in ((3, h, qkv), (1, o, h), (2, h, 2 * inter), (1, inter, h)))
    return mc.num_layers * (max_loras + 1) * per_layer * dtype.itemsize


def working_reserve(mc, max_num_batched_tokens: int, max_num_seqs: int, dtype: torch.dtype) -> int:
    """A bound on one step's transient memory: activations of the widest layer for every token, the
    sampler's float64 [rows, vocab] temporaries, and the float32 logits of a prompt-logprob chunk with
    their log-softmax (the scheduler caps such a row's chunk at PROMPT_LOGPROB_CHUNK tokens)."""
    from quiver.server.engine.scheduler import PROMPT_LOGPROB_CHUNK

    widest = max(2 * mc.intermediate_size, (mc.num_heads + 2 * mc.num_kv_heads) * mc.head_dim, mc.hidden_size)
    activations = 4 * max_num_batched_tokens * (widest + 2 * mc.hidden_size) * max(dtype.itemsize, 4)
    sampler = 6 * max_num_seqs * mc.vocab_size * 8
    prompt_logprobs = 3 * min(PROMPT_LOGPROB_CHUNK, max_num_batched_tokens) * mc.vocab_size * 4
    return activations + sampler + prompt_logprobs + 256 * MiB


def allocated(device: torch.device) -> int:
    """Bytes torch's allocator holds for tensors on `device` (0 off CUDA): the difference across a model's
    load is that engine's own use."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def device_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of a CUDA device, counting as free what torch's allocator caches unused here."""
    free, total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device), total


def kv_cache_blocks(config, mc, dtype: torch.dtype, device: torch.device, own_bytes: int = 0,
                    memory_info: Callable[[], tuple[int, int]] | None = None) -> int:
    """KV-cache blocks for this configuration: --num-kv-blocks, else --kv-cache-memory-mb, else (on a
    GPU) --gpu-memory-utilization x the device's memory less this engine's own use (own_bytes: the
    weights it placed, with the 4-bit base's dequantization scratch), its LoRA slots and its working reserve,
    and never more than memory_info() = (free, total) bytes says is free. Only this engine's use counts
    against its share: two engines in one process, or two Ray replicas of half a GPU each, each get their
    fraction (the memory others hold only caps what is left)."""
    per_block = kv_block_bytes(mc, config.block_size, dtype)
    if config.num_kv_blocks:
        return config.num_kv_blocks
    if config.kv_cache_memory_mb is not None or device.type != "cuda":
        return max(1, (config.kv_cache_memory_mb or CPU_KV_CACHE_MB) * MiB // per_block)
    free, total = (memory_info or (lambda: device_memory(device)))()
    held = (lora_slot_bytes(mc, config.max_loras, config.max_lora_rank, dtype)
            + working_reserve(mc, config.max_num_batched_tokens, config.max_num_seqs, dtype))
    share = config.gpu_memory_utilization * total - own_bytes
    budget = min(share, free) - held
    blocks = int(max(budget, 0) // per_block)
    log.info("KV cache: %d blocks of %d tokens (%.1f GiB) from %.0f%% of %.1f GiB, %.1f GiB ours already, "
             "%.1f GiB free", blocks, config.block_size, blocks * per_block / 2**30,
             100 * config.gpu_memory_utilization, total / 2**30, own_bytes / 2**30, free / 2**30)
    return blocks
