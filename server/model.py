"""A Llama-family decoder (llama, mistral, qwen2) in plain PyTorch over a flat token batch.

All tokens of a step, prefill chunks and decode tokens alike, go through the linear layers
as one [T, hidden] matrix; only attention looks at rows, through the paged KV cache.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from kernels import ref
from kernels.attention import prefix_paged_attention
from kernels.bottleneck_ref import bottleneck_apply_cpu
from kernels.lora import lora_apply
from .batch import StepInputs
from .model_config import ModelConfig
from .rope import apply_rope, rope_table

_MISSING = object()


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
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, max_len: int | None = None):
        super().__init__()
        self.cfg = cfg
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
        self.lora_slots = None  # LoraSlots, set by the runner
        self.bottleneck_slots = None  # BottleneckSlots, set by the runner

    # ---- loading -------------------------------------------------------------------------
    def load_weights(self, model_dir: str | Path) -> None:
        """Read HF safetensors, fusing q/k/v and gate/up as they arrive."""
        tensors = _Checkpoint(Path(model_dir))
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

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed if self.lm_head is None else self.lm_head

    # ---- forward -------------------------------------------------------------------------
    def forward(self, inp: StepInputs, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm, for every token of the step."""
        c = self.cfg
        t = inp.input_ids.shape[0]
        d, nh, nkv = c.head_dim, c.num_heads, c.num_kv_heads
        x = F.embedding(inp.input_ids, self.embed)
        if inp.virtual_index is not None:
            x.index_copy_(0, inp.virtual_index, inp.virtual_embeds.to(x.dtype))
        cos, sin = self.rope_cos[inp.positions], self.rope_sin[inp.positions]
        lora = inp.lora
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(self.layers, kv_caches)):
            h = rms_norm(x, layer.input_norm, c.rms_norm_eps)
            qkv = self._linear(h, layer.qkv, layer.qkv_bias, lora, i, "qkv")
            q, k, v = qkv.split([nh * d, nkv * d, nkv * d], dim=-1)
            q = apply_rope(q.view(t, nh, d), cos, sin)
            k = apply_rope(k.view(t, nkv, d), cos, sin)
            ref.write_kv(k_cache, v_cache, k, v.view(t, nkv, d), inp.slot_mapping)
            attn = self._attention(q, k_cache, v_cache, inp).view(t, nh * d)
            x = self._residual(x, self._linear(attn, layer.o, layer.o_bias, lora, i, "o"), inp, i, "attn")
            h = rms_norm(x, layer.post_attn_norm, c.rms_norm_eps)
            gate, up = self._linear(h, layer.gate_up, layer.gate_up_bias, lora, i, "gate_up").chunk(2, dim=-1)
            x = self._residual(x, self._linear(F.silu(gate) * up, layer.down, layer.down_bias, lora, i, "down"),
                               inp, i, "mlp")
        return rms_norm(x, self.norm, c.rms_norm_eps)

    def _residual(self, r, o, inp: StepInputs, layer: int, loc: str) -> torch.Tensor:
        """r + o, plus each bottleneck row's s * up(act(down(z))), z = r + o or o per adapter."""
        y = r + o
        if inp.bottleneck is not None:
            down, down_b, up, up_b = self.bottleneck_slots.layers[layer][loc]
            z = torch.addcmul(o, inp.bottleneck_sum, r)
            bottleneck_apply_cpu(z, y, down, down_b, up, up_b, self.bottleneck_slots.activations, inp.bottleneck)
        return y

    def _linear(self, x, weight, bias, lora, layer: int, group: str) -> torch.Tensor:
        """The base projection, plus each token's own LoRA delta (and DoRA column scale)."""
        y = F.linear(x, weight, bias)
        if lora is None:
            return y
        buf = self.lora_slots.layers[layer][group]
        dora = None
        if lora.dora_index is not None:  # DoRA: y += (g - 1) * (Wx), g per slot and column
            dora = buf.dora_m1.index_select(0, lora.dora_index) * (y if bias is None else y - bias)
        if lora.single_slot is not None and buf.slot_views:  # CPU, one adapter for all: y += (x A^T) B
            a_t, b = buf.slot_views[lora.single_slot]
            y.addmm_(torch.mm(x, a_t), b)
        else:
            lora_apply(x, y, buf.a, buf.b, buf.offsets, lora)
        if dora is not None:
            y += dora
        return y

    def _attention(self, q, k_cache, v_cache, inp: StepInputs) -> torch.Tensor:
        out = torch.empty_like(q)
        for grp in inp.attn_groups:
            b, nq = grp.block_tables.shape[0], grp.max_q
            qg = q.index_select(0, grp.query_index).view(b, nq, *q.shape[1:])
            if grp.attn_bias is not None:  # CPU: the mask was built once for the step
                og = ref.paged_attention(qg, k_cache, v_cache, grp.block_tables, grp.attn_bias, self.scale)
            else:
                og = prefix_paged_attention(qg, k_cache, v_cache, grp.block_tables, grp.q_start, grp.q_lens,
                                            grp.kv_offset, grp.prefix_len, self.scale)
            og = og.reshape(b * nq, *q.shape[1:])
            if grp.valid_index is not None:
                og = og.index_select(0, grp.valid_index)
            out.index_copy_(0, grp.token_index, og)
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.head_weight).float()


class _Checkpoint:
    """Safetensors tensors read one at a time, so loading never holds two copies of the model."""

    def __init__(self, model_dir: Path):
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no safetensors weights in {model_dir}")
        self._handles = [safe_open(str(model_dir / name), framework="pt") for name in files]
        self._where = {key: h for h in self._handles for key in h.keys()}

    def pop(self, key: str, default=_MISSING):
        handle = self._where.pop(key, None)
        if handle is None:
            if default is _MISSING:
                raise KeyError(f"checkpoint has no tensor {key!r}")
            return default
        return handle.get_tensor(key)

    def __iter__(self):
        return iter(list(self._where))
