"""Batched multi-LoRA dispatch: the PyTorch path on CPU, Triton kernels on CUDA."""
from __future__ import annotations

import torch

from .lora_ref import lora_apply_cpu
from .meta import LoraMeta


def lora_apply(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               offsets: tuple[int, ...], meta: LoraMeta) -> None:
    """y += lora_expand(lora_shrink(x)) for every token (see kernels.lora_ref for the maths);
    on CPU, b is block-diagonal (kernels.lora_ref.block_diagonal) and offsets go unused."""
    if x.is_cuda:
        from . import lora_triton
        lora_triton.lora_apply(x, y, a, b, offsets, meta)
    else:
        lora_apply_cpu(x, y, a, b, meta)
