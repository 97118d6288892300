"""The Triton kernels' per-step metadata (kernels.grouping says what it is made of): adapter tokens as
segments with the row tiles SGMV launches, and attention rows as a decode group and a prefill group, each
row's keys walked by the kernel itself through its block table."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quiver.kernels.grouping import QuerySlots, attention_tiles, group_tokens, mark_in_order, query_slots, row_tiles


@dataclass
class TritonLoraMeta:
    """SGMV reads the segments through m_tiles, one program per 16 tokens of one adapter; BGMV reads
    seg_index and each token's slot."""
    token_slots: torch.Tensor  # [T] int64, -1 = no adapter
    seg_index: torch.Tensor  # [n] int64 token indices, grouped by slot
    seg_slots: torch.Tensor  # [S]
    seg_starts: torch.Tensor  # [S]
    seg_lens: torch.Tensor  # [S]
    m_tiles: torch.Tensor  # [tiles, 2] int32 (segment, row block): the SGMV grid
    max_len: int  # longest segment: SGMV from a row tile's worth of tokens, BGMV below

    UPLOAD = ("token_slots", "seg_index", "seg_slots", "seg_starts", "seg_lens", "m_tiles")


def triton_lora_meta(token_slots: torch.Tensor) -> TritonLoraMeta | None:
    """token_slots [T] (-1: no adapter) -> the metadata, None when no token has an adapter."""
    g = group_tokens(token_slots)
    if g is None:
        return None
    return TritonLoraMeta(token_slots, g.seg_index, g.seg_slots, g.seg_starts, g.seg_lens, row_tiles(g.seg_lens),
                          g.max_len)


@dataclass
class PagedGroup:
    """Rows of one kernel launch: query i of row b is its token q_start[b] + i, stored from cache index
    kv_offset[b] on, after prefix_len[b] adapter prefix keys."""
    slots: QuerySlots
    block_tables: torch.Tensor  # [B, NB]
    q_start: torch.Tensor  # [B]
    q_lens: torch.Tensor  # [B]
    kv_offset: torch.Tensor  # [B]
    prefix_len: torch.Tensor  # [B]
    tiles: torch.Tensor  # [tiles, 2] int32 (row, block of queries x heads): the kernel's grid

    UPLOAD = ("slots", "block_tables", "q_start", "q_lens", "kv_offset", "prefix_len", "tiles")


def paged_attention_meta(layout, heads_per_kv: int) -> list[PagedGroup]:
    """Decode rows (one query) and prefill rows form one group each (layout: engine.step.RowLayout)."""
    lens = layout.lens
    groups = [_paged_group(members, layout, heads_per_kv)
              for members in ((lens == 1).nonzero().squeeze(1), (lens > 1).nonzero().squeeze(1)) if members.numel()]
    mark_in_order(groups, layout.num_tokens)
    return groups


def _paged_group(members: torch.Tensor, layout, heads_per_kv: int) -> PagedGroup:
    q_lens, starts = layout.lens[members], layout.starts[members]
    kv_off = layout.kv_offsets[members]
    nb = -(-int((kv_off + starts + q_lens).max()) // layout.block_size)  # blocks the rows' keys span
    return PagedGroup(query_slots(layout.offsets[members], q_lens), layout.block_tables[members, :nb], starts, q_lens,
                      kv_off, layout.prefix_lens[members], attention_tiles(q_lens, heads_per_kv))
