"""The Triton kernels' per-step metadata (kernels.grouping says what it is made of): adapter tokens as
segments with the row tiles SGMV launches, and attention's rows as one launch over the flat tokens, each
row's keys walked by the kernel itself through its block table."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quiver.kernels.grouping import ROW_TILE, attention_tiles, group_tokens, row_tiles


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
class PagedAttention:
    """Every row of a step in one kernel launch (kernels.attention_triton): query i of row b is flat token
    q_offset[b] + i, the row's token q_start[b] + i, stored from cache index kv_offset[b] on, after
    prefix_len[b] adapter prefix keys. Nothing is padded: the kernel reads q and writes out as [T, H, D]."""
    block_tables: torch.Tensor  # [B, NB]
    q_offset: torch.Tensor  # [B]
    q_start: torch.Tensor  # [B]
    q_lens: torch.Tensor  # [B]
    kv_offset: torch.Tensor  # [B]
    prefix_len: torch.Tensor  # [B]
    tiles: torch.Tensor  # [tiles, 2] int32 (row, block of queries x heads): the kernel's grid, longest first
    max_keys: int  # keys the step's longest row sees: how far split-KV may split it

    UPLOAD = ("block_tables", "q_offset", "q_start", "q_lens", "kv_offset", "prefix_len", "tiles")


def paged_attention_meta(layout, heads_per_kv: int) -> list[PagedAttention]:
    """The step's rows, decode and prefill alike, as one launch (layout: engine.step.RowLayout)."""
    q_lens, starts, kv_off = layout.lens, layout.starts, layout.kv_offsets
    keys = kv_off + starts + q_lens  # each row's last query sees keys 0 .. keys - 1
    nb = -(-int(keys.max()) // layout.block_size)  # blocks the rows' keys span
    tiles = attention_tiles(q_lens, heads_per_kv)
    # the tiles that walk the most keys start first, so the launch does not end on a long tile alone
    row, blk = tiles[:, 0].long(), tiles[:, 1].long()
    last_q = torch.minimum(((blk + 1) * ROW_TILE - 1) // heads_per_kv, q_lens[row] - 1)
    tiles = tiles[torch.argsort(kv_off[row] + starts[row] + last_q, descending=True, stable=True)]
    return [PagedAttention(layout.block_tables[:, :nb], layout.offsets, starts, q_lens, kv_off, layout.prefix_lens,
                           tiles, int(keys.max()))]
