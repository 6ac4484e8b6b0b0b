"""OFA's position machinery: relative-position buckets for text (log buckets) and image grids (2-D offsets), image
position ids, and the bilinear resizing IFSeg applies to tables defined on its 32x32 training grid.

Positions never enter the token stream (``entangle_position_embedding`` is off): an absolute bias
``(W_q LN(p_i)) . (W_k LN(p_j)) / sqrt(head_dim * attn_scale_factor)`` and per-layer relative-bias tables indexed by
these buckets are added to the attention logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def token_buckets(bucket_size: int, max_position: int = 1024) -> torch.Tensor:
    """``max_position x max_position`` bucket ids of text offsets ``i - j``: exact within ``bucket_size // 2``,
    logarithmic beyond (sign kept), shifted to ``0..2 * bucket_size - 2``."""
    relative = torch.arange(max_position)[:, None] - torch.arange(max_position)[None, :]
    sign = torch.sign(relative)
    mid = bucket_size // 2
    near = (relative < mid) & (relative > -mid)
    magnitude = torch.where(near, torch.full_like(relative, mid - 1), relative.abs())
    log_pos = torch.ceil(torch.log(magnitude / mid) / math.log((max_position - 1) / mid) * (mid - 1)) + mid
    buckets = torch.where(magnitude.le(mid), relative, log_pos.int() * sign).long()
    return buckets + bucket_size - 1


def image_buckets(bucket_size: int) -> torch.Tensor:
    """``(n+1) x (n+1)`` bucket ids (``n = bucket_size**2``) of 2-D offsets between the cells of a ``bucket_size``
    square grid (index 0 is a special row/column with its own three ids), as BEiT's relative position index."""
    rows, cols = torch.meshgrid(torch.arange(bucket_size), torch.arange(bucket_size), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()])
    offsets = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + bucket_size - 1
    num = (2 * bucket_size - 1) ** 2 + 3
    index = torch.zeros(bucket_size ** 2 + 1, bucket_size ** 2 + 1, dtype=torch.long)
    index[1:, 1:] = offsets[..., 0] * (2 * bucket_size - 1) + offsets[..., 1]
    index[0, :] = num - 3
    index[:, 0] = num - 2
    index[0, 0] = num - 1
    return index


def image_position_ids(grid: tuple[int, int], bucket_size: int) -> torch.Tensor:
    """Ids ``col + row * bucket_size + 1`` of the cells of an ``h x w`` grid, row-major (``h*w``). Columns past
    ``bucket_size`` alias into the next row, as in OFA."""
    h, w = grid
    return (torch.arange(w)[None, :] + torch.arange(h)[:, None] * bucket_size + 1).flatten()


def resize_grid_rows(table: torch.Tensor, source: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False, no antialias) of per-cell rows ``..., S, D`` on grid ``source`` to
    grid ``target`` -> ``..., h*w, D``. The identity when the grids are equal."""
    if tuple(source) == tuple(target):
        return table
    *lead, _, dim = table.shape
    maps = table.reshape(-1, *source, dim).permute(0, 3, 1, 2)
    maps = F.interpolate(maps, size=tuple(target), mode="bilinear", align_corners=False)
    return maps.permute(0, 2, 3, 1).reshape(*lead, target[0] * target[1], dim)


def resize_pair_bias(bias: torch.Tensor, source: tuple[int, int], target: tuple[int, int], keys_first: bool
                     ) -> torch.Tensor:
    """A bias ``B,H,S,S`` between the cells of grid ``source`` resized to ``target`` on both the query and the key
    axis (keys first or queries first, as the official code orders them) -> ``B,H,n,n``."""
    if tuple(source) == tuple(target):
        return bias

    def keys(x):
        return resize_grid_rows(x.unsqueeze(-1), source, target).squeeze(-1)

    def queries(x):
        return keys(x.transpose(-1, -2)).transpose(-1, -2)

    return queries(keys(bias)) if keys_first else keys(queries(bias))
