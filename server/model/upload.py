"""A step's small host tensors (token ids, positions, block tables, masks, adapter metadata, sampling
parameters) sent to the device in one copy, into buffers kept from step to step.

defer(obj, attr, tensor) records a host tensor; upload() packs every recorded tensor into one pinned
buffer, copies it to the device once (non-blocking, on the current stream), and sets each obj.attr to
its view of the device buffer, with the tensor's dtype and shape. On the CPU, defer sets obj.attr at
once and upload() does nothing.
"""
from __future__ import annotations

import torch

ALIGN = 16  # bytes: every view starts at an offset its dtype can be read from


class StepUpload:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.on_host = self.device.type == "cpu"
        self._items: list[tuple[object, str, torch.Tensor]] = []
        self._host: torch.Tensor | None = None  # uint8, pinned on CUDA
        self._dev: torch.Tensor | None = None
        self._copied = None  # the event of the last copy: the host buffer is not refilled before it

    def defer(self, obj, attr: str, tensor: torch.Tensor) -> None:
        if self.on_host or tensor.device.type != "cpu":
            setattr(obj, attr, tensor)
        else:
            self._items.append((obj, attr, tensor.contiguous()))

    def upload(self) -> None:
        if not self._items:
            return
        offsets, total = [], 0
        for _, _, t in self._items:
            offsets.append(total)
            total += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
        self._reserve(total)
        if self._copied is not None:
            self._copied.synchronize()
        for (_, _, t), off in zip(self._items, offsets):
            n = t.numel() * t.element_size()
            self._host[off:off + n].copy_(t.reshape(-1).view(torch.uint8))
        self._dev[:total].copy_(self._host[:total], non_blocking=True)
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        for (obj, attr, t), off in zip(self._items, offsets):
            n = t.numel() * t.element_size()
            setattr(obj, attr, self._dev[off:off + n].view(t.dtype).view(t.shape))
        self._items = []

    def _reserve(self, nbytes: int) -> None:
        if self._host is None or self._host.numel() < nbytes:
            size = max(nbytes, 2 * (0 if self._host is None else self._host.numel()), 1 << 16)
            if self._copied is not None:
                self._copied.synchronize()
            self._host = torch.empty(size, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
            self._dev = torch.empty(size, dtype=torch.uint8, device=self.device)
