"""Speculative decoding: prompt-lookup (n-gram) drafts with no extra model, or a draft model's (engine.draft).

With n-gram drafts a decoding row proposes up to K tokens: those that followed the most recent earlier
occurrence of its last n tokens (n from prompt_lookup_max down to prompt_lookup_min) in its own prompt and
output; with a draft model, that model's greedy continuation (per adapter, its draft LoRA's). The row
then runs 1 + d tokens in one step, with logits at each, and every position draws its token exactly as
plain decoding would draw it at that output index (sampler: greedy argmax, or Gumbel-max with noise hashed
from the seed and the output index). Drafts are accepted while the drawn token equals the draft; the first
token that differs (the correction), or the one after the last draft (the bonus), ends the run.

For a sampled row this is the standard rejection rule for a one-hot proposal (both kinds of draft are made
without the target's draws), realised with the same noise
plain decoding uses: under Gumbel-max, the draw equals draft x with probability p(x), and given that it
does not, it is distributed as p with x removed and renormalised. So the output distribution is the
non-speculative one, and more: a seeded request yields the same tokens with speculation on or off.

Rows that decode one token per step as before (eligible() says why): grammars (their matcher advances per
token), penalties and bad words (they depend on the tokens before each position), a min_tokens not yet
reached, and any row not decoding (prefill chunks, prompt logprobs).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from quiver.server.engine.sequence import Sequence

FIELDS = {"ngram": {"num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"},
          "draft_model": {"num_speculative_tokens", "model", "draft_lora"}}
LATER = {"eagle": "EAGLE", "eagle3": "EAGLE-3", "medusa": "Medusa",
         "mtp": "multi-token prediction", "suffix": "suffix decoding"}


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's --speculative-config, of which the "ngram" (prompt lookup) and "draft_model" methods; draft_lora
    (Quiver's) maps a target adapter's name to the PEFT LoRA folder its rows' draft model gets merged in."""
    num_speculative_tokens: int
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    method: str = "ngram"
    model: str | None = None  # the draft model's folder (draft_model)
    draft_lora: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str | dict | None) -> SpeculativeConfig | None:
        """From the flag's JSON text (or its dict); None when off. ValueError names what is wrong."""
        if spec is None or isinstance(spec, SpeculativeConfig):
            return spec
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--speculative-config is not JSON: {exc}") from None
        if not isinstance(spec, dict):
            raise ValueError("--speculative-config must be a JSON object")
        spec = dict(spec)
        method = spec.pop("method", None) or ("draft_model" if spec.get("model") else "ngram")
        if method not in FIELDS:
            what = LATER.get(method, repr(method))
            raise ValueError(f"--speculative-config: method {method!r} ({what}) is not supported; \"ngram\" "
                             "(prompt lookup) and \"draft_model\" are")
        unknown = set(spec) - FIELDS[method]
        if unknown:
            raise ValueError(f"--speculative-config: unknown field(s) for {method}: {', '.join(sorted(unknown))}")
        if "num_speculative_tokens" not in spec:
            raise ValueError("--speculative-config: num_speculative_tokens is required")
        if method == "draft_model":
            if not isinstance(spec.get("model"), str) or not spec["model"]:
                raise ValueError("--speculative-config: draft_model needs \"model\", the draft model's folder")
            lora = spec.get("draft_lora", {})
            if not isinstance(lora, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in lora.items()):
                raise ValueError("--speculative-config: draft_lora must map adapter names to LoRA folders")
        cfg = cls(method=method, **spec)
        ints = (cfg.num_speculative_tokens, cfg.prompt_lookup_max, cfg.prompt_lookup_min)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
            raise ValueError("--speculative-config: its fields must be integers")
        if not 1 <= cfg.num_speculative_tokens <= 64:
            raise ValueError("--speculative-config: num_speculative_tokens must be in [1, 64]")
        if not 1 <= cfg.prompt_lookup_min <= cfg.prompt_lookup_max:
            raise ValueError("--speculative-config: need 1 <= prompt_lookup_min <= prompt_lookup_max")
        return cfg


def eligible(seq: Sequence) -> bool:
    """Whether the row's token at each position can be drawn without knowing the drafts before it."""
    p = seq.params
    return (seq.grammar is None and not p.penalized and not p.bad_words_ids
            and seq.num_output_tokens >= p.min_tokens and seq.num_computed == seq.num_tokens - 1)


def lookup(tokens: list[int], k: int, n_max: int, n_min: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of tokens' last n (longest n first)."""
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(n_max, len(arr) - 1), n_min - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)  # starts 0 .. len - 1 - n: not the suffix
        hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return arr[start:start + k].tolist()
    return []


class Proposer:
    """Drafts for the scheduler: a row's proposal, capped so that it never passes max_tokens or the context."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int, drafts=None):
        self.config, self.max_model_len = config, max_model_len
        self.drafts = drafts  # engine.draft.DraftModels, for the draft_model method

    @classmethod
    def of(cls, config: SpeculativeConfig | None, max_model_len: int, runner=None) -> Proposer | None:
        if config is None:
            return None
        if config.method == "draft_model":
            from quiver.server.engine.draft import DraftModels
            return cls(config, max_model_len, DraftModels(config, runner))
        return cls(config, max_model_len)

    def __call__(self, seq: Sequence) -> list[int]:
        if not eligible(seq):
            return []
        c = self.config
        room = min(c.num_speculative_tokens, seq.params.max_tokens - seq.num_output_tokens - 1,
                   self.max_model_len - seq.num_tokens - 1)
        if room <= 0:
            return []
        tokens = seq.token_ids[seq.num_virtual:]  # soft-prompt placeholders are not text
        if self.drafts is not None:
            return self.drafts.for_row(seq).propose(seq, tokens, room)
        return lookup(tokens, room, c.prompt_lookup_max, c.prompt_lookup_min)


def verify(sampled: list[Sequence], drawn: list[int]) -> dict[str, tuple[list[int], list[int]]]:
    """A step's draws (sampled[i] drew drawn[i]; a row with d drafts draws d + 1 times in a row) -> per request
    id, the tokens it emits and the indices of their draws: drawn tokens while the draft before each held,
    i.e. the accepted drafts and then the correction or the bonus."""
    rows: dict[str, tuple[Sequence, list[int]]] = {}
    for i, seq in enumerate(sampled):
        rows.setdefault(seq.request_id, (seq, []))[1].append(i)
    out = {}
    for rid, (seq, index) in rows.items():
        a = 0
        while a < len(seq.draft) and drawn[index[a]] == seq.draft[a]:
            a += 1
        out[rid] = [drawn[i] for i in index[:a + 1]], index[:a + 1]
    return out
