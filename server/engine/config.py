"""Engine configuration: one plain dataclass that checks itself."""
from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("auto", "float32", "bfloat16", "float16")
# CPU / GPU defaults of the batch limits left unset
BATCH_DEFAULTS = {"cpu": (64, 2048), "cuda": (256, 8192)}


@dataclass
class EngineConfig:
    model: str | None = None  # HF dir, .gguf file, or None for the embedded SmolLM2
    dtype: str = "auto"  # auto: bf16 on CPUs with AVX512-BF16/AMX, else float32; the checkpoint's on a GPU
    device: str = "cpu"
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: from kv_cache_memory_mb, or on a GPU from gpu_memory_utilization
    kv_cache_memory_mb: int | None = None  # None: 512 on the CPU; on a GPU what gpu_memory_utilization leaves
    gpu_memory_utilization: float = 0.9  # fraction of the GPU's memory the engine may take in all
    max_num_seqs: int | None = None  # None: 64 on the CPU, 256 on a GPU
    max_num_batched_tokens: int | None = None  # None: 2048 on the CPU, 8192 on a GPU
    max_model_len: int | None = None  # None: the model's max_position_embeddings, capped at 8192
    num_threads: int | None = None  # None: every core torch sees
    seed: int | None = None  # for requests without one; None: each draws its own from the OS
    max_loras: int = 8  # LoRA adapters resident in device slots (and most distinct per step)
    max_lora_rank: int = 16
    lora_starvation_steps: int = 32  # a request blocked by --max-loras this long stops others overtaking it
    # LoRA adapters kept in host memory; beyond, the LRU unused one goes back to disk. None: on a GPU the pinned
    # budget, 2 x max_loras (families.lora); on the CPU no limit (see __post_init__)
    max_cpu_loras: int | None = None
    allow_pickle: bool = False  # read adapter_model.bin / pytorch_adapter.bin (torch.load with weights_only)
    max_adapter_mb: int = 2048  # larger adapter weight files are refused
    served_model_name: str | list[str] | None = None  # vLLM's list: the first is the one responses carry
    kernels: str = "auto"  # kernel backend: auto (Triton on CUDA, torch elsewhere), torch, triton
    enable_prefix_caching: bool = True  # keep full KV blocks, keyed by tokens and adapter, for later requests
    quantization: str | None = None  # nf4 / fp4: quantize the base's projections at load (bitsandbytes)
    double_quant: bool = True  # with quantization: 8-bit absmax as QLoRA trains (bnb_4bit_use_double_quant)
    quantize_embeddings: bool = False  # the embedding table and output head 4-bit too (not exact to bitsandbytes)
    # vLLM's --speculative-config (JSON text or its dict; speculate.SpeculativeConfig once checked); None: off
    speculative_config: object | None = None
    # no compiled decoder layers (server.model.compiled): every step runs eagerly op by op; on a GPU always so
    enforce_eager: bool = True
    # CPU: the projections a few-row step streams remapped onto 2 MiB pages at load (server.model.huge_pages)
    huge_pages: bool = True

    def __post_init__(self) -> None:
        seqs, tokens = BATCH_DEFAULTS["cuda" if self.device.startswith("cuda") else "cpu"]
        self.max_num_seqs = self.max_num_seqs or seqs
        self.max_num_batched_tokens = self.max_num_batched_tokens or tokens
        if self.max_cpu_loras is None and self.device.startswith("cuda"):
            # bounded, as vLLM's (max_loras) and LoRAX's host caches are: every staged adapter there is pinned,
            # page-locked memory. On the CPU the host tier is the serving memory itself, pageable, beside a KV
            # cache of a fixed size: adapters stay until unloaded unless a limit is given
            from quiver.server.families.lora import PINNED_PER_SLOT
            self.max_cpu_loras = max(1, PINNED_PER_SLOT * self.max_loras)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not (self.device in ("cpu", "meta") or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("kv_cache_memory_mb",):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_cpu_loras is not None and self.max_cpu_loras < max(1, self.max_loras):
            raise ValueError("max_cpu_loras must be >= max_loras (the CPU tier holds every adapter in a slot)")
        if self.max_loras < 0:
            raise ValueError("max_loras must be >= 0")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError("max_model_len must be >= 1")
        from quiver.kernels.ops import BACKENDS
        if self.kernels != "auto" and self.kernels not in BACKENDS:
            raise ValueError(f"kernels must be auto or one of {', '.join(BACKENDS)}, got {self.kernels!r}")
        if self.quantization not in (None, "nf4", "fp4"):
            raise ValueError(f"quantization must be nf4 or fp4, got {self.quantization!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError("num_threads must be >= 1")
        from quiver.server.engine.speculate import SpeculativeConfig
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
