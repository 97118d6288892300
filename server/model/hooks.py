"""Where adapter effects enter the decoder: the model calls these hooks, the adapter families
implement them. A step carries the hooks of the families that have rows in it (usually none), in
three lists: step.hooks.embed, .linear and .residual (engine.step.StepHooks)."""
from __future__ import annotations

from typing import Protocol

import torch


class EmbedHook(Protocol):
    def embed(self, x: torch.Tensor) -> None:
        """Overwrite rows of the step's input embeddings x [T, hidden] in place."""


class LinearHook(Protocol):
    def linear(self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
        """The fused projection `group` of `layer` ("qkv", "o", "gate_up", "down") gave y = W x + bias
        for x [T, in]; return y with each token's adapter delta added."""


class ResidualHook(Protocol):
    def residual(self, layer: int, loc: str, r: torch.Tensor, o: torch.Tensor, y: torch.Tensor) -> None:
        """After a sub-block ("attn" or "mlp") whose output o joined the residual r as y = r + o,
        add each token's adapter term to y in place."""
