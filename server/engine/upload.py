"""A step's small host tensors (token ids, positions, block tables, masks, adapter metadata, sampling
parameters) sent to the device in one copy, into buffers kept from step to step.

What goes is declared, not listed by hand: every per-step structure names its tensor fields in a class
attribute UPLOAD, and a name whose value is another such structure (or a list of them) is followed.
send(step) packs every declared host tensor into one pinned buffer, copies it to the device once
(non-blocking, on the current stream), and points each field at its view of the device buffer, with the
tensor's dtype and shape. On the CPU the tensors are where they are used already: send does nothing.
"""
from __future__ import annotations

import torch

ALIGN = 16  # bytes: every view starts at an offset its dtype can be read from


def declared(root) -> list[tuple[object, str, torch.Tensor]]:
    """(owner, field, host tensor) for every tensor `root` declares, each owner visited once."""
    found, seen, todo = [], set(), [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        for name in type(obj).UPLOAD:
            value = getattr(obj, name)
            if isinstance(value, torch.Tensor):
                if value.device.type == "cpu":
                    found.append((obj, name, value))
            elif isinstance(value, (list, tuple)):
                todo.extend(v for v in value if hasattr(type(v), "UPLOAD"))
            elif hasattr(type(value), "UPLOAD"):
                todo.append(value)
    return found


class StepUpload:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.on_host = self.device.type == "cpu"
        self._host: torch.Tensor | None = None  # uint8, pinned on CUDA
        self._dev: torch.Tensor | None = None
        self._copied = None  # the event of the last copy: the host buffer is not refilled before it

    def send(self, root) -> None:
        if self.on_host:
            return
        items = [(obj, name, t.contiguous()) for obj, name, t in declared(root)]
        if not items:
            return
        offsets, total = [], 0
        for _, _, t in items:
            offsets.append(total)
            total += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
        self._reserve(total)
        if self._copied is not None:
            self._copied.synchronize()
        for (_, _, t), off in zip(items, offsets):
            self._host[off:off + t.numel() * t.element_size()].copy_(t.reshape(-1).view(torch.uint8))
        self._dev[:total].copy_(self._host[:total], non_blocking=True)
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        for (obj, name, t), off in zip(items, offsets):
            setattr(obj, name, self._dev[off:off + t.numel() * t.element_size()].view(t.dtype).view(t.shape))

    def _reserve(self, nbytes: int) -> None:
        if self._host is None or self._host.numel() < nbytes:
            size = max(nbytes, 2 * (0 if self._host is None else self._host.numel()), 1 << 16)
            if self._copied is not None:
                self._copied.synchronize()
            self._host = torch.empty(size, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
            self._dev = torch.empty(size, dtype=torch.uint8, device=self.device)
