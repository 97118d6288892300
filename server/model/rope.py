"""Rotary position embeddings: the cos/sin table once at start, matching transformers' maths.

Quiver's KV cache keeps each token's key already rotated, so a table row is the rotation of one
absolute position and never changes. Types whose frequencies transformers recomputes from the
forward's length (`dynamic`, `longrope`) get, at row p, what transformers uses when it decodes
token by token and position p is the last one: see `rope_table`.

What is read from `cfg.rope_scaling` (besides `cfg.head_dim`, `cfg.rope_theta`,
`cfg.max_position_embeddings`):
  all:      rope_type, partial_rotary_factor (default 1.0)
  linear:   factor
  llama3:   factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
  dynamic:  factor (its reference length is cfg.max_position_embeddings, as in transformers)
  yarn:     factor (None: max_position_embeddings / original), original_max_position_embeddings,
            attention_factor, mscale, mscale_all_dim, beta_fast, beta_slow, truncate (all optional
            but original_max_position_embeddings)
  longrope: short_factor, long_factor, original_max_position_embeddings, factor, attention_factor
            (the last two optional). Phi-3 keeps original_max_position_embeddings and
            partial_rotary_factor at the top of config.json; transformers moves both into
            rope_parameters (the top-level original_max_position_embeddings wins), so the config
            reader must copy them into rope_scaling.
`cfg.max_position_embeddings` must be the checkpoint's value, not a serving limit: dynamic scales
against it, and yarn/longrope derive `factor` from it when the config gives none.
"""
from __future__ import annotations

import math

import torch

from quiver.kernels.ops import cpu_rope, serves
from quiver.server.model.config import ModelConfig


def rotary_dim(cfg: ModelConfig, scaling: dict | None = None) -> int:
    """How many leading dims of a head rotate: head_dim × partial_rotary_factor (Phi-4-mini: 0.75)."""
    scaling = cfg.rope_scaling if scaling is None else scaling
    return int(cfg.head_dim * scaling.get("partial_rotary_factor", 1.0))


def _exponents(dim: int) -> torch.Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64).float() / dim


def _llama3(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(cfg: ModelConfig, s: dict, base: float, dim: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate the low frequencies by `factor`, keep the high ones, ramp between."""
    original = s["original_max_position_embeddings"]
    factor = s.get("factor") or cfg.max_position_embeddings / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = s.get("attention_factor")
    if attention is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attention = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base**_exponents(dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention


def _longrope(cfg: ModelConfig, s: dict, base: float, dim: int, max_len: int) -> tuple[torch.Tensor, float]:
    """Per-row inverse frequencies [max_len, dim/2]: short_factor below the original length, long at and above."""
    original = s["original_max_position_embeddings"]
    factor = s.get("factor") or cfg.max_position_embeddings / original
    attention = s.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    shape = _exponents(dim)
    short = 1.0 / (torch.tensor(s["short_factor"], dtype=torch.float32) * base**shape)
    long = 1.0 / (torch.tensor(s["long_factor"], dtype=torch.float32) * base**shape)
    use_long = (torch.arange(max_len) >= original)[:, None]
    return torch.where(use_long, long, short), attention


def _dynamic(cfg: ModelConfig, s: dict, base: float, dim: int, max_len: int) -> torch.Tensor:
    """Per-row inverse frequencies [max_len, dim/2] for dynamic NTK at seq_len = max(p + 1, max_pos).

    Rows inside max_position_embeddings use the frequencies transformers builds at init (Python
    floats); longer rows the float32 tensor maths its decorator runs for a grown sequence.
    """
    factor, max_pos = s["factor"], cfg.max_position_embeddings
    initial_base = base * ((factor * max_pos / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    initial = 1.0 / (initial_base ** _exponents(dim))
    seq_len = torch.arange(1, max_len + 1, dtype=torch.int64).clamp(min=max_pos)
    grown_base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    grown = 1.0 / (grown_base[:, None] ** _exponents(dim))
    return torch.where((seq_len > max_pos)[:, None], grown, initial)


def inverse_frequencies(cfg: ModelConfig, max_len: int, theta: float | None = None,
                        scaling: dict | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention_factor): inv_freq [rotary_dim/2], or [max_len, rotary_dim/2] for the
    position-dependent types; attention_factor multiplies cos and sin (yarn, longrope)."""
    s = cfg.rope_scaling if scaling is None else scaling
    base = cfg.rope_theta if theta is None else theta
    dim = rotary_dim(cfg, s)
    kind = s.get("rope_type", "default")
    if kind == "yarn":
        return _yarn(cfg, s, base, dim)
    if kind == "longrope":
        return _longrope(cfg, s, base, dim, max_len)
    if kind == "dynamic":
        return _dynamic(cfg, s, base, dim, max_len), 1.0
    inv_freq = 1.0 / (base ** _exponents(dim))
    if kind == "linear":
        inv_freq = inv_freq / s["factor"]
    elif kind == "llama3":
        inv_freq = _llama3(inv_freq, s)
    elif kind != "default":
        raise ValueError(f"rope_type {kind!r} is not supported")
    return inv_freq, 1.0


def rope_table(cfg: ModelConfig, max_len: int, theta: float | None = None,
               scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_len, rotary_dim] float32 in the rotate-half layout; row p rotates absolute position p.

    rotary_dim = head_dim × partial_rotary_factor (= head_dim unless the config says otherwise).
    `theta` overrides the rope base and `scaling` the rope_scaling dict, for layers with their own
    rope (Gemma 3's sliding layers: base rope_local_base_freq and rope_type default).

    Position-dependent types, as transformers decoding one token per forward computes them:
    - dynamic: row p uses the NTK frequencies for seq_len = max(p + 1, max_position_embeddings).
      transformers prefilling a long prompt in one forward gives every token of it the frequencies
      of the full length; Quiver rotates each token by its own position's row, so a prompt past
      max_position_embeddings gets keys as if it had been decoded token by token.
    - longrope: row p uses long_factor iff p >= original_max_position_embeddings, short_factor
      otherwise, and every row carries the attention factor. transformers picks one set per forward
      from its length (a long prefill uses long_factor for all its tokens), and Phi-3's `generate`
      re-prefills the whole sequence with long_factor once it crosses the original length; Quiver
      keeps the short-factor keys of the first original_max_position_embeddings positions.
    """
    inv_freq, attention = inverse_frequencies(cfg, max_len, theta, scaling)
    positions = torch.arange(max_len, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention, emb.sin() * attention


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """torch_rope, in one C++ op on the CPU where Quiver's kernels are built."""
    if cos.dtype == x.dtype and serves(x):
        return cpu_rope(x, cos, sin)
    return torch_rope(x, cos, sin)


def torch_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos, sin: [T, R] in x's dtype, R <= D: the first R dims of each head rotate
    (rotate-half within them), the other D - R pass through (partial rotary, as Phi-3's)."""
    r = cos.shape[-1]
    rot, rest = (x, None) if r == x.shape[-1] else (x[..., :r], x[..., r:])
    half = r // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos[:, None, :] + rotated * sin[:, None, :]
    return out if rest is None else torch.cat((out, rest), dim=-1)
