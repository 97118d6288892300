"""The decoder's layers as one torch.compile'd region (inductor's CPU backend): norms, q/k norms, rope,
activation and residual adds fused into a few generated C++ loops per layer, one Python call per step.

The projections and attention stay the model's own (packed oneDNN / 4-bit weights, the paged KV cache
and the op backend's attention metadata): inside the region each is one opaque custom op
(quiver::linear, quiver::attend) that looks its weight, cache and step up by model id and layer, so no
graph breaks at them. Only steps without adapter hooks take the region (hooks change what happens
inside a layer); the embedding lookup and its hooks stay before it, the output head after.

Shapes: the token count T is symbolic (one graph for every T >= 2, and one for T = 1, as torch
specialises size 1), so the start-up warm-up (engine.warmup: a prefill and a decode step) compiles all
that serving runs; inductor's FX graph cache keeps the generated code on disk (TORCHINDUCTOR_CACHE_DIR,
by default under QUIVER_CACHE/inductor).
"""
from __future__ import annotations

import itertools
import logging
import os
import shutil
import weakref

import torch

from quiver.kernels.ops import cache_root

log = logging.getLogger(__name__)

_MODELS: dict[str, weakref.ref] = {}  # id -> LlamaModel, for the custom ops
_STEPS: dict[str, tuple] = {}  # id -> (step, kv_caches) of the step running now
_IDS = itertools.count()


def compiler_missing() -> str | None:
    """Why inductor cannot build its C++ here (None: it can)."""
    from torch._inductor import config
    cxx = config.cpp.cxx[-1] or "g++"
    return None if shutil.which(cxx) else f"no C++ compiler ({cxx}) found: inductor needs one to compile"


def cache_dir() -> None:
    """Inductor's on-disk cache under QUIVER_CACHE unless TORCHINDUCTOR_CACHE_DIR says otherwise."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))


def _model(model_id: str):
    return _MODELS[model_id]()


@torch.library.custom_op("quiver::linear", mutates_args=())
def linear_op(x: torch.Tensor, model_id: str, layer: int, group: str) -> torch.Tensor:
    """y = x W^T + b for one fused projection of one layer: the model's own weight, in whatever form."""
    layer_mod = _model(model_id).layers[layer]
    weight, bias = getattr(layer_mod, group), getattr(layer_mod, group + "_bias")
    return torch.nn.functional.linear(x, weight, bias) if isinstance(weight, torch.Tensor) else weight.linear(x, bias)


@linear_op.register_fake
def _(x, model_id, layer, group):
    weight = getattr(_model(model_id).layers[layer], group)
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("quiver::attend", mutates_args=())
def attend_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, model_id: str, layer: int) -> torch.Tensor:
    """Write k, v [T, KV, D] to the layer's cache and attend with q [T, H, D] -> [T, H, D] (Ops.attention)."""
    model = _model(model_id)
    step, kv_caches = _STEPS[model_id]
    k_cache, v_cache = kv_caches[layer]
    model.ops.write_kv(k_cache, v_cache, k, v, step.slot_mapping)
    return model.ops.attention(q, k_cache, v_cache, step.attention, model.scale, model.windows[layer],
                               model.cfg.attn_softcap)


@attend_op.register_fake
def _(q, k, v, model_id, layer):
    return torch.empty_like(q)


class CompiledLayers:
    """model.layers' forward over x [T, hidden] (embedded) -> hidden after the final norm, compiled."""

    def __init__(self, model):
        # a string (an int turns symbolic in the traced code), the same in every process (a key of the disk cache)
        self.model_id = f"m{next(_IDS)}"
        _MODELS[self.model_id] = weakref.ref(model)
        weakref.finalize(model, _MODELS.pop, self.model_id, None)
        model_id = self.model_id
        self.run = torch.compile(lambda x, ropes: model.compiled_layers(x, ropes, model_id), dynamic=True,
                                 fullgraph=True)

    def __call__(self, x, ropes, step, kv_caches) -> torch.Tensor:
        _STEPS[self.model_id] = (step, kv_caches)
        try:
            return self.run(x, ropes)
        finally:
            _STEPS.pop(self.model_id, None)


def compile_layers(model) -> CompiledLayers | None:
    """The compiled region (it compiles on its first steps: engine.warmup runs them at start-up), or None
    with one log line when this machine cannot compile."""
    why = compiler_missing()
    if why:
        log.warning("%s; decode steps run eagerly (--enforce-eager silences this)", why)
        return None
    cache_dir()
    from torch._inductor import config
    config.emulate_precision_casts = True  # round where eager rounds (bf16 intermediates), not once at the end
    return CompiledLayers(model)
