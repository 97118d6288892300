"""Engine configuration: one plain dataclass that checks itself."""
from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class EngineConfig:
    model: str | None = None  # HF dir, .gguf file, or None for the embedded SmolLM2
    dtype: str = "float32"
    device: str = "cpu"
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: derived from kv_cache_memory_mb
    kv_cache_memory_mb: int = 512
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings, capped at 8192
    num_threads: int | None = None  # None: every core torch sees
    seed: int = 0
    max_loras: int = 8  # LoRA adapters resident in device slots (and most distinct per step)
    max_lora_rank: int = 16
    lora_starvation_steps: int = 32  # a request blocked by --max-loras this long stops others overtaking it
    max_cpu_loras: int | None = None  # LoRA adapters kept in host memory; beyond, the LRU unused one goes back to disk
    allow_pickle: bool = False  # read adapter_model.bin / pytorch_adapter.bin (torch.load with weights_only)
    max_adapter_mb: int = 2048  # larger adapter weight files are refused
    served_model_name: str | None = None
    kernels: str = "auto"  # kernel backend: auto (Triton on CUDA, torch elsewhere), torch, triton

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "kv_cache_memory_mb", "max_lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_cpu_loras is not None and self.max_cpu_loras < max(1, self.max_loras):
            raise ValueError("max_cpu_loras must be >= max_loras (the CPU tier holds every adapter in a slot)")
        if self.max_loras < 0:
            raise ValueError("max_loras must be >= 0")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError("max_model_len must be >= 1")
        if self.kernels not in ("auto", "torch", "triton"):
            raise ValueError(f"kernels must be auto, torch or triton, got {self.kernels!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError("num_threads must be >= 1")
