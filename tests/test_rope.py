"""rope_table rows equal transformers' rotary embeddings, per rope type, at positions on both sides of
the original length; position-dependent types against a forward whose positions end at p."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import Gemma3TextConfig, LlamaConfig, Phi3Config
from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding, apply_rotary_pos_emb

from quiver.server.model.rope import apply_rope, rope_table

HEAD_DIM, THETA, MAX_LEN = 16, 10000.0, 64
POSITIONS = [0, 1, 7, 15, 16, 17, 31, 32, 33, 40, 63]


def fake_cfg(scaling: dict, max_pos: int, theta: float = THETA, head_dim: int = HEAD_DIM) -> SimpleNamespace:
    return SimpleNamespace(head_dim=head_dim, rope_theta=theta, rope_scaling=dict(scaling),
                           max_position_embeddings=max_pos)


def hf_rows(make, positions, per_position: bool, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin rows at `positions`; per_position: a fresh module per p, forward over 0..p, last row
    (what decoding token by token gives position p)."""
    x = torch.zeros(1, dtype=torch.float32)
    if not per_position:
        cos, sin = make()(x, torch.tensor([positions]), **kw)
        return cos[0], sin[0]
    rows = [make()(x, torch.arange(p + 1)[None], **kw) for p in positions]
    return torch.stack([c[0, -1] for c, _ in rows]), torch.stack([s[0, -1] for _, s in rows])


def check(cfg, make, per_position: bool, **kw):
    cos, sin = rope_table(cfg, MAX_LEN, **{k: v for k, v in kw.items() if k in ("theta", "scaling")})
    want_cos, want_sin = hf_rows(make, POSITIONS, per_position,
                                 **{k: v for k, v in kw.items() if k == "layer_type"})
    assert cos.shape == (MAX_LEN, want_cos.shape[-1]) and cos.dtype == torch.float32
    torch.testing.assert_close(cos[POSITIONS], want_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[POSITIONS], want_sin, atol=1e-6, rtol=0)


LLAMA_CASES = {
    "default": ({"rope_type": "default"}, False),
    "linear": ({"rope_type": "linear", "factor": 4.0}, False),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}, False),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}, False),
    "yarn-mscale": ({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "mscale": 0.707,
                     "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2, "truncate": False}, False),
    "yarn-no-factor": ({"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 8}, False),
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0}, True),
}


@pytest.mark.parametrize("name", list(LLAMA_CASES))
def test_llama_rope_types_equal_transformers(name):
    scaling, per_position = LLAMA_CASES[name]
    hf = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=HEAD_DIM, max_position_embeddings=32,
                     rope_parameters={**scaling, "rope_theta": THETA})
    check(fake_cfg(scaling, 32), lambda: LlamaRotaryEmbedding(hf), per_position)


def test_dynamic_rows_inside_the_original_length_are_unscaled_and_grow_after():
    cfg = fake_cfg({"rope_type": "dynamic", "factor": 2.0}, 32)
    cos, _ = rope_table(cfg, MAX_LEN)
    plain, _ = rope_table(fake_cfg({"rope_type": "default"}, 32), MAX_LEN)
    assert torch.equal(cos[:32], plain[:32])
    assert not torch.allclose(cos[40], plain[40])


def phi3_case(scaling: dict, prf: float):
    """A Phi-3 config.json's shape: original length and partial_rotary_factor at the top level."""
    hf = Phi3Config(hidden_size=64, num_attention_heads=4, max_position_embeddings=64,
                    original_max_position_embeddings=16, partial_rotary_factor=prf,
                    rope_parameters={**scaling, "rope_theta": THETA})
    ours = {**scaling, "original_max_position_embeddings": 16, "partial_rotary_factor": prf}
    return fake_cfg(ours, 64), (lambda: Phi3RotaryEmbedding(hf))


@pytest.mark.parametrize("prf", [1.0, 0.75])
def test_longrope_equals_phi3_token_by_token(prf):
    half = int(HEAD_DIM * prf) // 2
    scaling = {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(half)],
               "long_factor": [2.0 + 0.5 * i for i in range(half)]}
    cfg, make = phi3_case(scaling, prf)
    check(cfg, make, per_position=True)
    cos, _ = rope_table(cfg, MAX_LEN)
    assert cos.shape[-1] == int(HEAD_DIM * prf)
    assert cos[0, 0] > 1.0  # the attention factor scales every row


def test_partial_rotary_default_and_apply_rope_equal_phi3():
    cfg, make = phi3_case({"rope_type": "default"}, 0.5)
    check(cfg, make, per_position=False)
    cos, sin = rope_table(cfg, MAX_LEN)
    torch.manual_seed(0)
    q, k = torch.randn(2, 5, 3, HEAD_DIM).unbind(0)  # [T, heads, D]
    pos = torch.tensor([0, 3, 17, 40, 63])
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1), k.transpose(0, 1), cos[pos], sin[pos], unsqueeze_dim=0)
    torch.testing.assert_close(apply_rope(q, cos[pos], sin[pos]), want_q.transpose(0, 1))
    torch.testing.assert_close(apply_rope(k, cos[pos], sin[pos]), want_k.transpose(0, 1))
    assert torch.equal(apply_rope(q, cos[pos], sin[pos])[..., 8:], q[..., 8:])


def test_per_layer_theta_and_scaling_equal_gemma3():
    full = {"rope_type": "linear", "factor": 8.0}
    hf = Gemma3TextConfig(hidden_size=64, num_attention_heads=4, head_dim=HEAD_DIM, num_hidden_layers=2,
                          layer_types=["sliding_attention", "full_attention"], max_position_embeddings=32,
                          rope_parameters={"full_attention": {**full, "rope_theta": 1e6},
                                           "sliding_attention": {"rope_type": "default", "rope_theta": THETA}})
    cfg = fake_cfg(full, 32, theta=1e6)
    make = lambda: Gemma3RotaryEmbedding(hf)  # noqa: E731
    check(cfg, make, per_position=False, layer_type="full_attention")
    check(cfg, make, per_position=False, layer_type="sliding_attention", theta=THETA,
          scaling={"rope_type": "default"})


def test_apply_rope_full_width_is_the_rotate_half_rotation():
    cos, sin = rope_table(fake_cfg({"rope_type": "default"}, 32), 8)
    x = torch.randn(8, 2, HEAD_DIM)
    q, _ = apply_rotary_pos_emb(x.transpose(0, 1), x.transpose(0, 1), cos, sin, unsqueeze_dim=0)
    torch.testing.assert_close(apply_rope(x, cos, sin), q.transpose(0, 1))
