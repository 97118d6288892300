"""Device copies of every loaded bottleneck adapter, stacked per layer and location so that a
step runs them all with one batched op (widths zero-padded: padded units contribute nothing)."""
from __future__ import annotations

import torch

from adapters.bottleneck import BottleneckAdapter


class BottleneckSlots:
    def __init__(self, num_layers: int, hidden: int, dtype: torch.dtype, device):
        self.num_layers, self.hidden, self.dtype, self.device = num_layers, hidden, dtype, device
        self.adapters: list[BottleneckAdapter] = []
        self.layers: list[dict[str, tuple[torch.Tensor, ...]]] = []
        self.activations: list[str] = []
        self.input_is_sum = torch.zeros(1, device=device)  # per slot, plus 0 for base rows (last)
        self._index: dict[str, int] = {}

    def slot_of(self, name: str) -> int:
        return self._index[name]

    def register(self, adapter: BottleneckAdapter) -> int:
        self.adapters.append(adapter)
        self._stack()
        return len(self.adapters) - 1

    def unregister(self, name: str) -> None:
        self.adapters = [a for a in self.adapters if a.name != name]
        self._stack()

    def _stack(self) -> None:
        self._index = {a.name: i for i, a in enumerate(self.adapters)}
        if not self.adapters:
            self.layers, self.activations = [], []
            self.input_is_sum = torch.zeros(1, device=self.device, dtype=self.dtype)
            return
        n, h = len(self.adapters), self.hidden
        width = max(a.width for a in self.adapters)
        layers = []
        for layer in range(self.num_layers):
            groups = {}
            for loc in ("attn", "mlp"):
                down = torch.zeros(n, width, h)
                down_b = torch.zeros(n, width)
                up = torch.zeros(n, width, h)
                up_b = torch.zeros(n, h)
                for i, a in enumerate(self.adapters):
                    mod = a.modules.get((layer, loc))
                    if mod is not None:
                        m = mod.down.shape[0]
                        down[i, :m], down_b[i, :m], up[i, :m], up_b[i] = mod.down, mod.down_bias, mod.up.T, mod.up_bias
                groups[loc] = tuple(t.to(self.device, self.dtype) for t in (down, down_b, up, up_b))
            layers.append(groups)
        self.layers = layers
        self.activations = [a.activation for a in self.adapters]
        self.input_is_sum = torch.tensor([float(a.input_is_sum) for a in self.adapters] + [0.0],
                                         device=self.device, dtype=self.dtype)
