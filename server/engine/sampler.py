"""Next-token choice for all sampled rows at once.

Random rows use Gumbel-max with noise hashed from (request seed, output index, token id):
a row's draw depends on nothing but its own request, so the same seed gives the same
output whatever else is in the batch, and no per-row generator is needed.

The rows' parameters are laid out on the host before the forward pass and travel with the step's one
copy to the device (prepare; engine.upload); what comes back (tokens, whether each row's logits were
finite, logprobs) comes in one device-to-host copy (sample). Logprobs are the model's raw ones, before
any adjustment (logit_adjust) or temperature, as vLLM reports them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quiver.kernels.ops import finite_rows, greedy_rows
from quiver.server.engine import logit_adjust
from quiver.server.engine.sequence import Sequence, TokenLogprob

_MASK32 = 0xFFFFFFFF


@dataclass
class SampleResult:
    tokens: list[int]
    finite: list[bool]  # the row's logits were all finite (a row with NaN or Inf must not be used)
    logprobs: list[float] | None  # of the chosen token, under the model's raw distribution
    top: list[list[tuple[int, float]]] | None

    def logprobs_of(self, draws: list[int], n_top: int | None) -> list[TokenLogprob]:
        """The draws' tokens, each with its logprob and the n_top best; none when n_top is None."""
        return [] if n_top is None else [TokenLogprob(self.tokens[i], self.logprobs[i], self.top[i][:n_top])
                                         for i in draws]


@dataclass
class SamplingBatch:
    """The sampled rows' parameters, as host tensors (sent with the step)."""
    greedy_all: bool
    filtered: bool  # some row has top-k or top-p
    n_top: int | None  # most top logprobs a row asks for
    adjust: logit_adjust.Adjustments | None = None
    min_p: torch.Tensor | None = None  # [N] float32, when some random row has one
    temps: torch.Tensor | None = None  # [N] float32
    top_k: torch.Tensor | None = None  # [N] int64
    top_p: torch.Tensor | None = None  # [N] float32
    seeds: torch.Tensor | None = None  # [N] int64
    steps: torch.Tensor | None = None  # [N] int64, output index of the token being drawn
    greedy: torch.Tensor | None = None  # [N] bool

    UPLOAD = ("adjust", "min_p", "temps", "top_k", "top_p", "seeds", "steps", "greedy")


def prepare(seqs: list[Sequence], vocab: int, ahead: list[int] | None = None) -> SamplingBatch:
    """ahead: per row, how many tokens past the sequence's last one it draws (a draft's position; 0 when
    not speculating): its noise is that of the output index it would have without speculation."""
    params = [s.params for s in seqs]
    batch = SamplingBatch(greedy_all=all(p.greedy for p in params), filtered=any(p.top_k > 0 or p.top_p < 1
                                                                                 for p in params),
                          n_top=max((p.logprobs for p in params if p.logprobs is not None), default=None),
                          adjust=logit_adjust.plan(seqs, vocab))
    if batch.greedy_all:
        return batch
    if any(p.min_p > 0 and not p.greedy for p in params):
        batch.min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32)
    batch.temps = torch.tensor([p.temperature or 1.0 for p in params], dtype=torch.float32)
    batch.top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64)
    batch.top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
    batch.seeds = torch.tensor([s.seed for s in seqs], dtype=torch.int64)
    batch.steps = torch.tensor([s.num_output_tokens for s in seqs], dtype=torch.int64)
    if ahead is not None:
        batch.steps += torch.tensor(ahead, dtype=torch.int64)
    batch.greedy = torch.tensor([p.greedy for p in params], dtype=torch.bool)
    return batch


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # every product stays below 2**63: operands are < 2**32 and multipliers < 2**27
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def hashed_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """[N, vocab] uniforms in (0, 1) determined by (seed, step, token) alone."""
    # all 64 bits of the seed: the high half mixed apart from the low (a seed below 2**32 draws as it did)
    seed = _mix32(seeds & _MASK32) ^ _mix32((_mix32((seeds >> 32) & _MASK32) * 0x27D4EB2F) & _MASK32)
    base = _mix32((seed + steps * 0x27D4EB2F) & _MASK32)
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


def to_host(t: torch.Tensor) -> list:
    """The step's one device-to-host copy."""
    return t.tolist()


def filter_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every token whose probability is below min_p times the row's top probability."""
    probs = logits.softmax(dim=-1)
    floor = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < floor, float("-inf"))


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SampleResult:
    """logits: [N, V] float32, one row per prepared sequence (adjusted in place when batch.adjust is set)."""
    logprobs = torch.log_softmax(logits, dim=-1) if batch.n_top is not None else None
    if batch.adjust is None:
        greedy_tokens, finite = greedy_rows(logits)
    else:  # finite: of the model's logits, before the adjustment (which may set -inf)
        finite = finite_rows(logits)
        logit_adjust.apply(logits, batch.adjust)
        greedy_tokens = greedy_rows(logits)[0]
    if batch.greedy_all:
        tokens = greedy_tokens
    else:
        x = logits / batch.temps[:, None]
        if batch.min_p is not None:
            x = filter_min_p(x, batch.min_p)
        if batch.filtered:
            x = filter_top_k_top_p(x, batch.top_k, batch.top_p)
        gumbel = -torch.log(-torch.log(hashed_uniform(batch.seeds, batch.steps, logits.shape[-1])))
        tokens = torch.where(batch.greedy, greedy_tokens, (x.double() + gumbel).argmax(dim=-1))
    n_top = batch.n_top
    if n_top is None and tokens.device.type == "cpu":  # nothing to copy from a device: no packing into one copy
        return SampleResult(tokens.tolist(), finite.tolist(), None, None)
    columns = [tokens.double()[:, None], finite.double()[:, None]]
    if n_top is not None:
        columns.append(logprobs.gather(1, tokens[:, None]).double())
        if n_top:
            values, ids = logprobs.topk(n_top, dim=-1)
            columns += [values.double(), ids.double()]
    rows = to_host(torch.cat(columns, dim=1))
    result = SampleResult([int(r[0]) for r in rows], [r[1] == 1.0 for r in rows], None, None)
    if n_top is not None:
        result.logprobs = [r[2] for r in rows]
        result.top = [list(zip(map(int, r[3 + n_top:]), r[3:3 + n_top])) for r in rows]
    return result


def top_logprobs(logprobs: torch.Tensor, n: int) -> list[list[tuple[int, float]]]:
    if n == 0:
        return [[] for _ in range(logprobs.shape[0])]
    values, ids = logprobs.topk(n, dim=-1)
    return [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
