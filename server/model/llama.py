"""One decoder for every supported architecture (server.model.archs) in plain PyTorch over a flat token batch.

All tokens of a step, prefill chunks and decode tokens alike, go through the linear layers
as one [T, hidden] matrix; only attention looks at rows, through the paged KV cache. What differs between
architectures (norm placement and offset, q/k norms, activation, scales, soft-caps, per-layer windows and
rope) is read from the ModelConfig's fields, never from its model_type.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from quiver.kernels.ops import ACT_KINDS, Ops, cpu_act_mul, cpu_rms_norm, serves
from quiver.server.model.checkpoint import Checkpoint
from quiver.server.model.config import ModelConfig
from quiver.server.model.fused import FusedLayers
from quiver.server.model.fourbit import Packed4bit, Rows4bit, Scratch, Weight4bit, quantize, read_packed
from quiver.server.model.layout import GROUPS, checkpoint_groups, group_of, module_shapes, slice_bounds
from quiver.server.model.packed import PackedWeight, can_pack
from quiver.server.model.rope import apply_rope, rope_table


# layer norm weights in the checkpoint, by where they stand: before/after attention, before/after the MLP
NORMS = {"pre": {"attn_in": "input_layernorm", "mlp_in": "post_attention_layernorm"},
         "sandwich": {"attn_in": "input_layernorm", "attn_out": "post_attention_layernorm",
                      "mlp_in": "pre_feedforward_layernorm", "mlp_out": "post_feedforward_layernorm"},
         "post": {"attn_out": "post_attention_layernorm", "mlp_out": "post_feedforward_layernorm"}}
ACT = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
             fp32_product: bool = False) -> torch.Tensor:
    """torch_rms_norm, in one C++ op on the CPU where Quiver's kernels are built."""
    if weight.dtype == x.dtype and serves(x):
        return cpu_rms_norm(x, weight, eps, offset, fp32_product)
    return torch_rms_norm(x, weight, eps, offset, fp32_product)


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                   fp32_product: bool = False) -> torch.Tensor:
    """x / rms(x) · (offset + w). Llama rounds the normalised x to x's dtype before the weight; Gemma and
    OLMo 2 (fp32_product) multiply in float32 and round the product, as transformers does for each."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if fp32_product:
        return (xf * (offset + weight.float())).to(x.dtype)
    return (offset + weight) * xf.to(x.dtype) if offset else weight * xf.to(x.dtype)


def act_mul(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up of the fused [T, 2I] gate/up output, in one C++ op on the CPU where it is built."""
    if activation in ACT_KINDS and serves(gate_up):
        return cpu_act_mul(gate_up, activation)
    gate, up = gate_up.chunk(2, dim=-1)
    return ACT[activation](gate) * up


class DecoderLayer(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, four_bit: bool = False):
        """four_bit: the projections (qkv, o, gate_up, down) are set at load, 4-bit where the checkpoint
        or --quantization makes them so, and never allocated here at full precision."""
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * d

        def param(*shape):
            return torch.nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)

        def weight(*shape):
            return None if four_bit else param(*shape)

        self.norms = torch.nn.ParameterDict({where: param(h) for where in NORMS[cfg.norm_layout]})
        # the same parameters by place, None where the layout has no norm: one tuple read per layer and step
        self.norm_slots = tuple(self.norms[w] if w in self.norms else None
                                for w in ("attn_in", "attn_out", "mlp_in", "mlp_out"))
        qk = {"head": (d, d), "proj": (cfg.num_heads * d, cfg.num_kv_heads * d)}.get(cfg.qk_norm)
        self.q_norm, self.k_norm = (param(qk[0]), param(qk[1])) if qk else (None, None)
        self.qkv = weight(qkv_out, h)
        self.qkv_bias = param(qkv_out) if cfg.qkv_bias else None
        self.o = weight(h, cfg.num_heads * d)
        self.o_bias = param(h) if cfg.o_bias else None
        self.gate_up = weight(2 * cfg.intermediate_size, h)
        self.gate_up_bias = param(2 * cfg.intermediate_size) if cfg.mlp_bias else None
        self.down = weight(h, cfg.intermediate_size)
        self.down_bias = param(h) if cfg.mlp_bias else None


class LlamaModel(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, ops: Ops, dtype: torch.dtype = torch.float32, max_len: int | None = None,
                 quantization: str | None = None, double_quant: bool = True, quantize_embeddings: bool = False,
                 huge_pages: bool = True):
        """quantization: "nf4"/"fp4" quantizes the projections at load (bitsandbytes, with or without
        double quantization); a checkpoint saved in bitsandbytes' 4-bit format (cfg.quantization) is read
        as it is. quantize_embeddings: the embedding table and output head too, in the base's 4-bit type
        (bitsandbytes keeps them at full precision: this trades exactness for memory). huge_pages: packed
        projections on 2 MiB pages (server.model.packed)."""
        super().__init__()
        self.cfg = cfg
        self.ops = ops
        self.dtype = dtype
        self.huge_pages = huge_pages
        self.quantization, self.double_quant = quantization, double_quant
        four_bit = bool(quantization or cfg.quantization)
        if quantize_embeddings and not four_bit:
            raise ValueError("quantize_embeddings needs a 4-bit base (--quantization, or a 4-bit checkpoint)")

        def table():  # set at load when it is kept 4-bit
            return None if quantize_embeddings else torch.nn.Parameter(
                torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype), requires_grad=False)

        self.embed = table()
        self.layers = torch.nn.ModuleList(DecoderLayer(cfg, dtype, four_bit) for _ in range(cfg.num_layers))
        self.norm = torch.nn.Parameter(torch.empty(cfg.hidden_size, dtype=dtype), requires_grad=False)
        self.lm_head = None if cfg.tie_word_embeddings else table()
        self.packed_head: PackedWeight | None = None  # set at load on the CPU (server.model.packed)
        length = max_len or cfg.max_position_embeddings
        tables = [rope_table(cfg, length)]
        if cfg.local_rope is not None:
            local = cfg.local_rope
            tables.append(rope_table(cfg, length, theta=float(local.get("rope_theta", cfg.rope_theta)), scaling=local))
        for i, (cos, sin) in enumerate(tables):
            self.register_buffer(f"rope_cos{i}", cos.to(dtype), persistent=False)
            self.register_buffer(f"rope_sin{i}", sin.to(dtype), persistent=False)
        windows = cfg.layer_windows or (None,) * cfg.num_layers
        # each layer's rope table: 1 for sliding layers where they have their own, None for no rope
        self.layer_rope = [None if i in cfg.no_rope_layers else int(cfg.local_rope is not None and w is not None)
                           for i, w in enumerate(windows)]
        # a window as long as the longest sequence hides nothing: those layers take full attention
        self.windows = [w if w is not None and w < length else None for w in windows]
        self.window_sizes = tuple(sorted({w for w in self.windows if w is not None}))
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim ** -0.5
        self.compiled = None  # server.model.compiled.CompiledLayers, set by the runner unless --enforce-eager
        self.fused: FusedLayers | None = None  # few-row steps' layers in one C++ call (server.model.fused), at load

    # ---- loading -------------------------------------------------------------------------
    def load_weights(self, model_dir: str | Path) -> None:
        """Read HF safetensors, fusing q/k/v and gate/up as they arrive."""
        tensors = Checkpoint(Path(model_dir))
        scratch = Scratch(self.device)  # sized below, to the largest tile
        with torch.no_grad():
            self.embed = self._table(tensors.pop("model.embed_tokens.weight"), self.embed, scratch)
            self.norm.copy_(tensors.pop("model.norm.weight"))
            head = tensors.pop("lm_head.weight", None)
            if not self.cfg.tie_word_embeddings:
                if head is None:
                    raise ValueError("checkpoint has no lm_head.weight but tie_word_embeddings is false")
                self.lm_head = self._table(head, self.lm_head, scratch)
            for i, layer in enumerate(self.layers):
                p = f"model.layers.{i}."
                take = lambda name: tensors.pop(p + name)  # noqa: E731
                for where, name in NORMS[self.cfg.norm_layout].items():
                    layer.norms[where].copy_(take(f"{name}.weight"))
                if layer.q_norm is not None:
                    layer.q_norm.copy_(take("self_attn.q_norm.weight"))
                    layer.k_norm.copy_(take("self_attn.k_norm.weight"))
                for group, modules in checkpoint_groups(self.cfg).items():
                    keys = [p + ("self_attn." if group in ("qkv", "o") else "mlp.") + m + ".weight" for m in modules]
                    if getattr(layer, group) is None:
                        setattr(layer, group, self._read_4bit(tensors, keys, scratch))
                    else:
                        getattr(layer, group).copy_(torch.cat([tensors.pop(k) for k in keys]))
                if layer.qkv_bias is not None:
                    layer.qkv_bias.copy_(torch.cat([take(f"self_attn.{n}_proj.bias") for n in "qkv"]))
                if layer.o_bias is not None:
                    layer.o_bias.copy_(take("self_attn.o_proj.bias"))
                if layer.gate_up_bias is not None:
                    layer.gate_up_bias.copy_(torch.cat([take("mlp.gate_proj.bias"), take("mlp.up_proj.bias")]))
                    layer.down_bias.copy_(take("mlp.down_proj.bias"))
        leftover = [k for k in tensors if not k.endswith("rotary_emb.inv_freq")]
        if leftover:
            raise ValueError(f"unexpected tensors in checkpoint: {leftover[:5]}")
        if can_pack(self.device, self.dtype):
            self._pack_projections()
        tile = max((w.scratch_elements for w in self.four_bit_weights()), default=0)
        scratch.reserve(tile, self.dtype)
        self.fused = FusedLayers.of(self)

    def _pack_projections(self) -> None:
        """Every full-precision projection as a PackedWeight (server.model.packed), in place of its tensor;
        the output head too, which with tied embeddings is a packed copy of the table (its memory again:
        not over a 4-bit base, which is there to save memory)."""
        for layer in self.layers:
            for group in GROUPS:
                weight = getattr(layer, group)
                if isinstance(weight, torch.Tensor):
                    delattr(layer, group)  # a registered parameter: the packed copy replaces it
                    setattr(layer, group, PackedWeight(weight, self.huge_pages))
        head = self.embed if self.lm_head is None else self.lm_head
        if isinstance(head, torch.Tensor) and not (self.quantization or self.cfg.quantization):
            self.packed_head = PackedWeight(head, self.huge_pages)
            if self.lm_head is not None:  # untied: the packed head is the only copy
                del self.lm_head
                self.lm_head = None

    def _table(self, weight: torch.Tensor, param, scratch: Scratch):
        """The embedding table or output head: copied into its parameter, or quantized and kept 4-bit."""
        if param is not None:
            return param.copy_(weight)
        if weight.shape[1] % 64:
            raise ValueError(f"quantize_embeddings needs a hidden size divisible by 64, not {weight.shape[1]}")
        packed = quantize(weight, self.quantization or self.cfg.quantization, self.double_quant)
        return Weight4bit([packed.to(self.device)], scratch)

    @property
    def device(self) -> torch.device:
        return self.norm.device

    def _read_4bit(self, tensors: Checkpoint, keys: list[str], scratch: Scratch):
        """A fused group's projections as one Weight4bit: read packed, or quantized here with bitsandbytes.
        A group the checkpoint left unquantized (llm_int8_skip_modules) stays a plain tensor."""
        parts, shapes = [], module_shapes(self.cfg)
        for key in keys:
            packed = read_packed(tensors, key)
            want = shapes[key.rsplit(".", 2)[-2]]
            if packed is not None and packed.shape != want:
                raise ValueError(f"{key}: a 4-bit weight of shape {packed.shape}, the model's config needs {want}")
            if packed is None and self.quantization:
                packed = quantize(tensors.pop(key), self.quantization, self.double_quant)
            parts.append(packed if packed is not None else tensors.pop(key))
        if all(isinstance(p, Packed4bit) for p in parts):
            return Weight4bit([p.to(self.device) for p in parts], scratch)
        if any(isinstance(p, Packed4bit) for p in parts):
            raise ValueError(f"{keys}: some of these fused projections are 4-bit and some are not")
        return torch.nn.Parameter(torch.cat(parts).to(self.device, self.dtype), requires_grad=False)

    def _weights(self) -> list:
        """The tables and every fused projection, whatever form each is kept in (None where absent)."""
        return [self.embed, self.lm_head, self.packed_head,
                *(getattr(layer, group) for layer in self.layers for group in GROUPS)]

    def four_bit_weights(self) -> list[Weight4bit]:
        return [w for w in self._weights() if isinstance(w, Weight4bit)]

    def weight_bytes(self) -> int:
        """What the base's weights hold in memory (4-bit and prepacked projections, the scratch included)."""
        plain = sum(t.numel() * t.element_size() for t in self.parameters())
        packed = sum(w.nbytes for w in self._weights() if isinstance(w, PackedWeight))
        four = self.four_bit_weights()
        return plain + packed + sum(w.nbytes for w in four) + (four[0].scratch.nbytes if four else 0)

    def base_weight(self, layer: int, module: str) -> torch.Tensor | Rows4bit:
        """One checkpoint projection's [out, in] weight (Phi-3's qkv_proj: its whole fused group): a view into the
        fused tensor, a copy of a packed one, or a 4-bit one's Rows4bit (dequantized a block of rows at a time, as
        DoRA's norms read it)."""
        group, start, end = slice_bounds(self.cfg, module)
        weight = getattr(self.layers[layer], group)  # DecoderLayer names its weights by group
        if isinstance(weight, Weight4bit):
            return Rows4bit(weight.parts[group_of(self.cfg, module)[1]], self.dtype)
        if isinstance(weight, PackedWeight):
            return weight.dense()[start:end]
        return weight[start:end]

    # ---- forward -------------------------------------------------------------------------
    def forward(self, step, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm, for every token of the step.

        step (engine.step.Step): its input_ids, positions and slot_mapping [T] on the device, its attention
        metadata (the op backend's) and its `hooks`, the adapter effects (model.hooks). A step with no linear
        or residual hooks takes the compiled layers where the runner set them (model.compiled)."""
        c, hooks = self.cfg, step.hooks
        if isinstance(self.embed, Weight4bit):
            x = self.embed.lookup(step.input_ids, self.dtype)
        else:
            x = F.embedding(step.input_ids, self.embed)
        if c.embed_scale != 1.0 and not c.embed_scale_inputs:  # in the table: before soft prompts go in
            x = x * torch.tensor(c.embed_scale, dtype=x.dtype)
        for hook in hooks.embed:
            hook.embed(x)
        if c.embed_scale != 1.0 and c.embed_scale_inputs:
            x = x * c.embed_scale
        ropes = tuple((getattr(self, f"rope_cos{r}")[step.positions], getattr(self, f"rope_sin{r}")[step.positions])
                      for r in range(1 + (c.local_rope is not None)))
        if self.compiled is not None and not (hooks.linear or hooks.residual):
            return self.compiled(x, ropes, step, kv_caches)
        if self.fused is not None and (out := self.fused(x, ropes, step, kv_caches)) is not None:
            return out

        def linear(h, i, group):
            layer = self.layers[i]
            return self._linear(h, getattr(layer, group), getattr(layer, group + "_bias"), hooks, i, group)

        def attend(q, k, v, i):
            k_cache, v_cache = kv_caches[i]
            self.ops.write_kv(k_cache, v_cache, k, v, step.slot_mapping)
            return self.ops.attention(q, k_cache, v_cache, step.attention, self.scale, self.windows[i], c.attn_softcap)

        def residual(i, loc, r, o, y):
            for hook in hooks.residual:
                hook.residual(i, loc, r, o, y)
        return self.decode_layers(x, ropes, linear, attend, residual)

    def compiled_layers(self, x, ropes, model_id: str) -> torch.Tensor:
        """decode_layers through the custom ops of server.model.compiled: what torch.compile traces."""
        return self.decode_layers(x, ropes, lambda h, i, g: torch.ops.quiver.linear(h, model_id, i, g),
                                  lambda q, k, v, i: torch.ops.quiver.attend(q, k, v, model_id, i), None)

    def decode_layers(self, x, ropes, linear, attend, residual) -> torch.Tensor:
        """Every layer over the embedded x [T, hidden]; linear(h, layer, group) and attend(q, k, v, layer)
        [T, H, D] do the projections and attention, residual(layer, loc, r, o, y) (or None) adds adapter terms."""
        c = self.cfg
        t = x.shape[0]
        d, nh, nkv = c.head_dim, c.num_heads, c.num_kv_heads
        norm_of = functools.partial(rms_norm, eps=c.rms_norm_eps, offset=c.norm_offset, fp32_product=c.norm_fp32_product)
        for i, layer in enumerate(self.layers):
            attn_in, attn_out, mlp_in, mlp_out = layer.norm_slots
            qkv = linear(x if attn_in is None else norm_of(x, attn_in), i, "qkv")
            q, k, v = qkv.split([nh * d, nkv * d, nkv * d], dim=-1)
            if c.qk_norm == "proj":
                q, k = norm_of(q, layer.q_norm), norm_of(k, layer.k_norm)
            q, k = q.reshape(t, nh, d), k.reshape(t, nkv, d)
            if c.qk_norm == "head":
                q, k = norm_of(q, layer.q_norm), norm_of(k, layer.k_norm)
            if self.layer_rope[i] is not None:
                cos, sin = ropes[self.layer_rope[i]]
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            o = linear(attend(q, k, v.view(t, nkv, d), i).reshape(t, nh * d), i, "o")
            x = self._residual(x, o if attn_out is None else norm_of(o, attn_out), residual, i, "attn")
            h = x if mlp_in is None else norm_of(x, mlp_in)
            o = linear(act_mul(linear(h, i, "gate_up"), c.activation), i, "down")
            x = self._residual(x, o if mlp_out is None else norm_of(o, mlp_out), residual, i, "mlp")
        return norm_of(x, self.norm)

    def _residual(self, r, o, residual, layer: int, loc: str) -> torch.Tensor:
        y = r + o * self.cfg.residual_scale if self.cfg.residual_scale != 1.0 else r + o
        if residual is not None:
            residual(layer, loc, r, o, y)
        return y

    @staticmethod
    def _linear(x, weight, bias, hooks, layer: int, group: str) -> torch.Tensor:
        y = F.linear(x, weight, bias) if isinstance(weight, torch.Tensor) else weight.linear(x, bias)  # 4-bit, packed
        for hook in hooks.linear:
            y = hook.linear(layer, group, x, y, bias)
        return y

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.packed_head or (self.embed if self.lm_head is None else self.lm_head)
        logits = (F.linear(hidden, head) if isinstance(head, torch.Tensor) else head.linear(hidden, None)).float()
        if self.cfg.logit_scale != 1.0:
            logits = logits * self.cfg.logit_scale
        if self.cfg.final_softcap is not None:
            logits = torch.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        return logits
