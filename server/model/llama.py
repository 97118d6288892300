"""A Llama-family decoder (llama, mistral, qwen2) in plain PyTorch over a flat token batch.

All tokens of a step, prefill chunks and decode tokens alike, go through the linear layers
as one [T, hidden] matrix; only attention looks at rows, through the paged KV cache.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from quiver.kernels.ops import TorchOps
from quiver.server.model.checkpoint import Checkpoint
from quiver.server.model.config import ModelConfig
from quiver.server.model.hooks import StepHooks
from quiver.server.model.layout import slice_bounds
from quiver.server.model.rope import apply_rope, rope_table


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class DecoderLayer(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * d

        def param(*shape):
            return torch.nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)

        self.input_norm = param(h)
        self.post_attn_norm = param(h)
        self.qkv = param(qkv_out, h)
        self.qkv_bias = param(qkv_out) if cfg.qkv_bias else None
        self.o = param(h, cfg.num_heads * d)
        self.o_bias = param(h) if cfg.o_bias else None
        self.gate_up = param(2 * cfg.intermediate_size, h)
        self.gate_up_bias = param(2 * cfg.intermediate_size) if cfg.mlp_bias else None
        self.down = param(h, cfg.intermediate_size)
        self.down_bias = param(h) if cfg.mlp_bias else None


class LlamaModel(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, ops: TorchOps, dtype: torch.dtype = torch.float32, max_len: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.ops = ops
        self.dtype = dtype
        self.embed = torch.nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype), requires_grad=False)
        self.layers = torch.nn.ModuleList(DecoderLayer(cfg, dtype) for _ in range(cfg.num_layers))
        self.norm = torch.nn.Parameter(torch.empty(cfg.hidden_size, dtype=dtype), requires_grad=False)
        self.lm_head = None if cfg.tie_word_embeddings else torch.nn.Parameter(
            torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype), requires_grad=False)
        cos, sin = rope_table(cfg, max_len or cfg.max_position_embeddings)
        self.register_buffer("rope_cos", cos.to(dtype), persistent=False)
        self.register_buffer("rope_sin", sin.to(dtype), persistent=False)
        self.scale = cfg.head_dim ** -0.5

    # ---- loading -------------------------------------------------------------------------
    def load_weights(self, model_dir: str | Path) -> None:
        """Read HF safetensors, fusing q/k/v and gate/up as they arrive."""
        tensors = Checkpoint(Path(model_dir))
        with torch.no_grad():
            self.embed.copy_(tensors.pop("model.embed_tokens.weight"))
            self.norm.copy_(tensors.pop("model.norm.weight"))
            head = tensors.pop("lm_head.weight", None)
            if self.lm_head is not None:
                if head is None:
                    raise ValueError("checkpoint has no lm_head.weight but tie_word_embeddings is false")
                self.lm_head.copy_(head)
            for i, layer in enumerate(self.layers):
                p = f"model.layers.{i}."
                take = lambda name: tensors.pop(p + name)  # noqa: E731
                layer.input_norm.copy_(take("input_layernorm.weight"))
                layer.post_attn_norm.copy_(take("post_attention_layernorm.weight"))
                layer.qkv.copy_(torch.cat([take(f"self_attn.{n}_proj.weight") for n in "qkv"]))
                if layer.qkv_bias is not None:
                    layer.qkv_bias.copy_(torch.cat([take(f"self_attn.{n}_proj.bias") for n in "qkv"]))
                layer.o.copy_(take("self_attn.o_proj.weight"))
                if layer.o_bias is not None:
                    layer.o_bias.copy_(take("self_attn.o_proj.bias"))
                layer.gate_up.copy_(torch.cat([take("mlp.gate_proj.weight"), take("mlp.up_proj.weight")]))
                layer.down.copy_(take("mlp.down_proj.weight"))
                if layer.gate_up_bias is not None:
                    layer.gate_up_bias.copy_(torch.cat([take("mlp.gate_proj.bias"), take("mlp.up_proj.bias")]))
                    layer.down_bias.copy_(take("mlp.down_proj.bias"))
        leftover = [k for k in tensors if not k.endswith("rotary_emb.inv_freq")]
        if leftover:
            raise ValueError(f"unexpected tensors in checkpoint: {leftover[:5]}")

    def base_weight(self, layer: int, module: str) -> torch.Tensor:
        """One HF projection's [out, in] weight (a view into the fused tensors)."""
        group, start, end = slice_bounds(self.cfg, module)
        return getattr(self.layers[layer], group)[start:end]  # DecoderLayer names its weights by group

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed if self.lm_head is None else self.lm_head

    # ---- forward -------------------------------------------------------------------------
    def forward(self, inp, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm, for every token of the step.

        inp: the step's tensors (engine.step_inputs.StepInputs); its `hooks` carry the adapter effects."""
        c, ops, hooks = self.cfg, self.ops, inp.hooks
        t = inp.input_ids.shape[0]
        d, nh, nkv = c.head_dim, c.num_heads, c.num_kv_heads
        x = F.embedding(inp.input_ids, self.embed)
        for hook in hooks.embed:
            hook.embed(x)
        cos, sin = self.rope_cos[inp.positions], self.rope_sin[inp.positions]
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(self.layers, kv_caches)):
            h = rms_norm(x, layer.input_norm, c.rms_norm_eps)
            qkv = self._linear(h, layer.qkv, layer.qkv_bias, hooks, i, "qkv")
            q, k, v = qkv.split([nh * d, nkv * d, nkv * d], dim=-1)
            q = apply_rope(q.view(t, nh, d), cos, sin)
            k = apply_rope(k.view(t, nkv, d), cos, sin)
            ops.write_kv(k_cache, v_cache, k, v.view(t, nkv, d), inp.slot_mapping)
            attn = self._attention(q, k_cache, v_cache, inp).view(t, nh * d)
            x = self._residual(x, self._linear(attn, layer.o, layer.o_bias, hooks, i, "o"), hooks, i, "attn")
            h = rms_norm(x, layer.post_attn_norm, c.rms_norm_eps)
            gate, up = self._linear(h, layer.gate_up, layer.gate_up_bias, hooks, i, "gate_up").chunk(2, dim=-1)
            x = self._residual(x, self._linear(F.silu(gate) * up, layer.down, layer.down_bias, hooks, i, "down"),
                               hooks, i, "mlp")
        return rms_norm(x, self.norm, c.rms_norm_eps)

    @staticmethod
    def _residual(r, o, hooks: StepHooks, layer: int, loc: str) -> torch.Tensor:
        y = r + o
        for hook in hooks.residual:
            hook.residual(layer, loc, r, o, y)
        return y

    @staticmethod
    def _linear(x, weight, bias, hooks: StepHooks, layer: int, group: str) -> torch.Tensor:
        y = F.linear(x, weight, bias)
        for hook in hooks.linear:
            y = hook.linear(layer, group, x, y, bias)
        return y

    def _attention(self, q, k_cache, v_cache, inp) -> torch.Tensor:
        out = torch.empty_like(q)
        for grp in inp.attn_groups:
            nq = grp.max_q
            b = grp.query_index.shape[0] // nq
            qg = q.index_select(0, grp.query_index).view(b, nq, *q.shape[1:])
            og = self.ops.attention(qg, k_cache, v_cache, grp, self.scale).reshape(b * nq, *q.shape[1:])
            if grp.valid_index is not None:
                og = og.index_select(0, grp.valid_index)
            out.index_copy_(0, grp.token_index, og)
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.head_weight).float()
