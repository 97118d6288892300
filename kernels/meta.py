"""Per-step LoRA metadata: which adapter slot each token uses, grouped once per step, on the host.

The torch kernels read the padded or segmented forms; the Triton kernels read the sorted token
index, the segments and their row tiles. The caller uploads the tensors (LoraMeta.upload)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoraMeta:
    token_slots: torch.Tensor  # [T] slot per token, -1 = no adapter
    slot_lo: int  # the padded form covers slots slot_lo .. slot_lo + num_slots - 1
    num_slots: int
    # segmented form: token indices grouped by slot
    segments: list[tuple[int, int, int]]  # (slot, start in seg_index, tokens), host integers
    seg_index: torch.Tensor  # [T_lora] token indices, sorted by slot
    seg_slots: torch.Tensor  # [S] slot of each segment
    seg_starts: torch.Tensor  # [S] offset of each segment in seg_index
    seg_lens: torch.Tensor  # [S]
    # padded form (CPU): slot slot_lo + i owns rows i*max_len .. (i+1)*max_len - 1
    padded: bool
    max_len: int
    pad_index: torch.Tensor | None  # [num_slots * max_len] token index, padding -> 0
    pad_mask: torch.Tensor | None  # [num_slots, max_len, 1] bool, True for real rows (None: no padding)
    contiguous_from: int | None  # the padded rows are exactly tokens contiguous_from.. in order: no gather needed
    dora_index: torch.Tensor | None  # [T] slot per token with -1 -> the zero row, when a DoRA slot is used
    single_slot: int | None = None  # every token of the step uses this one slot
    m_tiles: torch.Tensor | None = None  # [tiles, 2] int32 (segment, row block): the Triton SGMV grid
    segments_from: int | None = None  # the segments are tokens segments_from.. in order: slices, no gather

    TENSORS = ("token_slots", "seg_index", "seg_slots", "seg_starts", "seg_lens", "pad_index", "pad_mask",
               "dora_index", "m_tiles")

    def upload(self, pack) -> None:
        """Hand every tensor field to `pack` (server.model.upload.StepUpload) for the step's one copy."""
        for name in self.TENSORS:
            if getattr(self, name) is not None:
                pack.defer(self, name, getattr(self, name))


ROW_TILE = 16  # rows of one SGMV program
LONG_SEGMENTS = 32  # tokens per adapter from which in-order segments take a matmul pair each (CPU)


def row_tiles(seg_lens: torch.Tensor, block: int = ROW_TILE) -> torch.Tensor:
    """[tiles, 2] int32 (segment, row block) of every `block`-row tile that holds tokens: the SGMV grid,
    so a step launches programs in proportion to its tokens, not segments x its longest segment."""
    blocks = (seg_lens + block - 1) // block
    seg = torch.repeat_interleave(torch.arange(seg_lens.numel()), blocks)
    first = torch.cumsum(blocks, 0) - blocks
    return torch.stack([seg, torch.arange(seg.numel()) - first[seg]], 1).to(torch.int32)


def padded_rows(x: torch.Tensor, meta: LoraMeta) -> torch.Tensor:
    """x [T, d] -> [num_slots, max_len, d] in the padded form's row order (a view when possible)."""
    n, m, start = meta.num_slots, meta.max_len, meta.contiguous_from
    if start is not None:
        return x[start:start + n * m].view(n, m, x.shape[1])
    return x.index_select(0, meta.pad_index).view(n, m, x.shape[1])


def add_padded_rows(y: torch.Tensor, delta: torch.Tensor, meta: LoraMeta) -> None:
    """y[token] += delta row for every real padded row (padding rows must already be zero)."""
    rows = delta.view(meta.num_slots * meta.max_len, -1)
    start = meta.contiguous_from
    if start is not None:
        y[start:start + rows.shape[0]] += rows
    else:
        y.index_add_(0, meta.pad_index, rows)


def build_lora_meta(token_slots: torch.Tensor, dora_slots: set[int], zero_row: int, forms: str = "torch",
                    padded: bool | None = None) -> LoraMeta | None:
    """None when no token uses an adapter: the fast path skips LoRA work entirely. Host tensors.

    forms: "torch" builds the padded or segmented forms the torch kernels read (`padded` forces the
    padded one, in tests; by default it is chosen from the step's shape); "triton" the row tiles.
    """
    used = token_slots >= 0
    if not bool(used.any()):
        return None
    lora_tokens = used.nonzero().squeeze(1)
    slots_of = token_slots[lora_tokens]
    order = torch.argsort(slots_of, stable=True)
    seg_index = lora_tokens[order]
    seg_slots, seg_lens = torch.unique_consecutive(slots_of[order], return_counts=True)
    seg_starts = torch.cumsum(seg_lens, 0) - seg_lens
    slot_lo = int(seg_slots.min())
    num_slots = int(seg_slots.max()) + 1 - slot_lo
    max_len = int(seg_lens.max())
    n_lora = int(lora_tokens.numel())
    dora_index = None
    if dora_slots and any(s in dora_slots for s in seg_slots.tolist()):
        dora_index = torch.where(used, token_slots, zero_row)
    if forms == "triton":
        return LoraMeta(token_slots, slot_lo, num_slots, [], seg_index, seg_slots, seg_starts, seg_lens, False,
                        max_len, None, None, None, dora_index, None, row_tiles(seg_lens))
    first = int(seg_index[0])
    in_order = torch.equal(seg_index, torch.arange(first, first + n_lora))  # rows grouped by adapter, as steps are
    # padding every slot of the range to max_len rows lets one bmm serve all adapters; worth it unless the
    # padding would more than double the rows, or the segments are in order and long enough (a prefill) for
    # a matmul pair each on plain slices, with no padding and no gather
    if padded is None:
        padded = num_slots * max_len <= 2 * n_lora + 16 and not (in_order and n_lora >= LONG_SEGMENTS * num_slots)
    pad_index = pad_mask = contiguous_from = None
    if padded:
        pad = torch.zeros(num_slots, max_len, dtype=torch.long)
        mask = torch.zeros(num_slots, max_len, 1, dtype=torch.bool)
        for s, start, n in zip(seg_slots.tolist(), seg_starts.tolist(), seg_lens.tolist()):
            pad[s - slot_lo, :n] = seg_index[start:start + n]
            mask[s - slot_lo, :n] = True
        pad_index = pad.reshape(-1)
        pad_mask = None if num_slots * max_len == n_lora else mask
        if pad_mask is None and in_order:
            contiguous_from = first
    segments = list(zip(seg_slots.tolist(), seg_starts.tolist(), seg_lens.tolist()))
    single = slot_lo if num_slots == 1 and n_lora == token_slots.numel() else None
    return LoraMeta(token_slots, slot_lo, num_slots, segments, seg_index, seg_slots, seg_starts, seg_lens, padded,
                    max_len, pad_index, pad_mask, contiguous_from, dora_index, single,
                    segments_from=first if in_order else None)


def attention_tiles(q_lens: torch.Tensor, heads_per_kv: int, block: int = ROW_TILE) -> torch.Tensor:
    """[tiles, 2] int32 (row, block) of the paged attention kernel's grid: a program holds `block`
    (query, head) pairs of one row and KV head, so a row of q queries needs ceil(q * heads_per_kv / block)."""
    return row_tiles(q_lens * heads_per_kv, block)
