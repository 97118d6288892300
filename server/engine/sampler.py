"""Next-token choice for all sampled rows at once.

Random rows use Gumbel-max with noise hashed from (request seed, output index, token id):
a row's draw depends on nothing but its own request, so the same seed gives the same
output whatever else is in the batch, and no per-row generator is needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quiver.server.engine.sequence import Sequence

_MASK32 = 0xFFFFFFFF


@dataclass
class SampleResult:
    tokens: list[int]
    logprobs: list[float] | None  # of the chosen token, under the model's raw distribution
    top: list[list[tuple[int, float]]] | None


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # every product stays below 2**63: operands are < 2**32 and multipliers < 2**27
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def hashed_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """[N, vocab] uniforms in (0, 1) determined by (seed, step, token) alone."""
    base = _mix32((_mix32(seeds & _MASK32) + steps * 0x27D4EB2F) & _MASK32)
    tokens = torch.arange(vocab, dtype=torch.int64, device=seeds.device)
    x = _mix32((base[:, None] + tokens[None, :] * 0x9E3779B1) & _MASK32)
    return (x.double() + 0.5) / 2.0**32


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every token outside a row's top-k (k = 0: all) and top-p nucleus."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    drop = (top_k[:, None] > 0) & (ranks >= top_k[:, None])
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of strictly better tokens
    sorted_logits = sorted_logits.masked_fill(before > top_p[:, None], float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
    """logits: [N, V] float32, one row per sequence in `seqs`."""
    params = [s.params for s in seqs]
    greedy_tokens = logits.argmax(dim=-1)
    if all(p.greedy for p in params):
        tokens = greedy_tokens
    else:
        dev = logits.device
        temps = torch.tensor([p.temperature or 1.0 for p in params], device=dev)
        x = logits / temps[:, None]
        if any(p.top_k > 0 or p.top_p < 1 for p in params):
            top_k = torch.tensor([p.top_k for p in params], device=dev)
            top_p = torch.tensor([p.top_p for p in params], device=dev)
            x = filter_top_k_top_p(x, top_k, top_p)
        seeds = torch.tensor([s.seed for s in seqs], dtype=torch.int64, device=dev)
        steps = torch.tensor([s.num_output_tokens for s in seqs], dtype=torch.int64, device=dev)
        gumbel = -torch.log(-torch.log(hashed_uniform(seeds, steps, logits.shape[-1])))
        sampled = (x.double() + gumbel).argmax(dim=-1)
        greedy = torch.tensor([p.greedy for p in params], device=dev)
        tokens = torch.where(greedy, greedy_tokens, sampled)
    n_top = max((p.logprobs for p in params if p.logprobs is not None), default=None)
    if n_top is None:
        return SampleResult(tokens.tolist(), None, None)
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
    top = top_logprobs(logprobs, n_top)
    return SampleResult(tokens.tolist(), chosen, top)


def top_logprobs(logprobs: torch.Tensor, n: int) -> list[list[tuple[int, float]]]:
    if n == 0:
        return [[] for _ in range(logprobs.shape[0])]
    values, ids = logprobs.topk(n, dim=-1)
    return [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
