"""The bottleneck family (AdapterHub seq_bn / double_seq_bn): every loaded adapter's device copy,
stacked per layer and location so that a step runs them all with one batched op (widths
zero-padded: padded units contribute nothing), and the residual hook that applies them."""
from __future__ import annotations

import torch

from quiver.adapters.bottleneck import BottleneckAdapter, load_bottleneck
from quiver.adapters.errors import AdapterError
from quiver.kernels.ops import Ops
from quiver.server.families.base import Binding

BASES = ("llama", "mistral", "qwen2")  # pre-norm decoders without extra norms or multipliers around the residual


class BottleneckFamily:
    kinds = ("bottleneck",)
    num_slots = 0  # all resident: an adapter's slot is its place in the stack

    def __init__(self, cfg, ops: Ops, dtype: torch.dtype, device, files: dict):
        self.cfg, self.ops, self.dtype, self.device, self.files = cfg, ops, dtype, device, files
        self.num_layers, self.hidden = cfg.num_layers, cfg.hidden_size
        self.order = 0
        self.adapters: list[BottleneckAdapter] = []
        self.layers: list[dict[str, tuple[torch.Tensor, ...]]] = []
        self.activations: list[str] = []
        self.kind_of: dict[str, torch.Tensor] = {}  # activation -> [slots] bool on the device
        self.input_is_sum = torch.zeros(1)  # per slot, plus 0 for base rows (last); on the host
        self._index: dict[str, int] = {}

    def read(self, name: str, path: str) -> BottleneckAdapter:
        cfg = self.cfg
        if cfg.model_type not in BASES:
            raise AdapterError(f"{name}: bottleneck adapters are served over {', '.join(BASES)} bases, where "
                               f"AdapterHub places them as Quiver does; this base is {cfg.model_type}")
        return load_bottleneck(name, path, cfg.num_layers, cfg.hidden_size, cfg.model_type, **self.files)

    def stage(self, adapter: BottleneckAdapter) -> BottleneckAdapter:
        return adapter  # stacked on the device at registration

    def register(self, adapter: BottleneckAdapter) -> None:
        self.adapters.append(adapter)
        self._stack()

    def unregister(self, name: str) -> None:
        self.adapters = [a for a in self.adapters if a.name != name]
        self._stack()

    def names(self) -> list[str]:
        return [a.name for a in self.adapters]

    def bind(self, name: str) -> Binding:
        return Binding(name, self)

    def virtual_tokens(self, name: str) -> int:
        return 0

    def place(self, bindings: list[Binding]) -> None:
        for b in bindings:
            b.slot = self._index[b.name]

    def info(self, name: str) -> dict:
        a = self.adapters[self._index[name]]
        return {"name": name, "family": "bottleneck", "width": a.width, "bytes": a.nbytes}

    def _stack(self) -> None:
        self._index = {a.name: i for i, a in enumerate(self.adapters)}
        if not self.adapters:
            self.layers, self.activations, self.kind_of = [], [], {}
            self.input_is_sum = torch.zeros(1)
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
        self.kind_of = {kind: torch.tensor([a == kind for a in self.activations], device=self.device)
                        for kind in set(self.activations)}
        self.input_is_sum = torch.tensor([float(a.input_is_sum) for a in self.adapters] + [0.0])

    def step_hook(self, step):
        token_slots = step.token_slots(self)
        if token_slots is None:
            return None
        return BottleneckStep(self, self.ops.bottleneck_meta(token_slots),
                              self.input_is_sum[token_slots][:, None].to(self.dtype))


class BottleneckStep:
    """y = r + o, plus each bottleneck row's s·up(act(down(z))) with z = r + o or o per adapter."""

    UPLOAD = ("meta", "input_is_sum")

    def __init__(self, family: BottleneckFamily, meta, input_is_sum: torch.Tensor):
        self.family, self.meta, self.input_is_sum = family, meta, input_is_sum  # [T, 1]

    def residual(self, layer: int, loc: str, r: torch.Tensor, o: torch.Tensor, y: torch.Tensor) -> None:
        f = self.family
        down, down_b, up, up_b = f.layers[layer][loc]
        z = torch.addcmul(o, self.input_is_sum, r)
        f.ops.bottleneck_apply(z, y, down, down_b, up, up_b, f.activations, self.meta, f.kind_of)
