"""ResCLIP (Yang et al., CVPR 2025): residual cross-correlation self-attention (RCS) and semantic feedback refinement
(SFR), a plug-in on the last-block methods (``naclip+resclip``, ``clearclip+resclip``, ``sclip+resclip``,
``clip+resclip``; ``resclip`` alone is ``naclip+resclip``, the paper's setting).

Per crop, as the official ``clip/model.py`` (yvhangyang/ResCLIP ``0e085f7``) computes it:

1. Blocks ``1 .. L-1`` run unchanged; the plain attention maps ``softmax(s q k^T)`` of blocks 6-9 (1-based,
   ``rcs_layers``) are averaged per head into ``RCS`` (``B,heads,T,T``, class token included).
2. Temp pass: the base's last block with RCS mixed in (no SFR) gives patch features and cosines with the text
   classifier, upsampled to the crop, refined by PAMR (10 iterations, dilations 8/16, the crop as guide) and turned into
   probabilities ``softmax(temp_logit_scale * .)`` over the queries.
3. :func:`patch_categories`: per pixel the argmax **query** (synonyms are separate categories; below ``temp_thd`` the
   pixel becomes query 0), then per 16x16 patch the most frequent one (smallest on ties, as ``torch.mode`` on CPU).
4. :func:`feedback_attention` (SFR): 1 where two patches share a category; with ``delete_same_entity`` a pair whose
   straight path (:func:`straight_path_validity`) leaves the category is decayed by ``exp(-steps / max_steps)``; each
   row of the flattened ``N x N`` matrix is blurred by a 1-D Gaussian (``sfr_std``, kernel ``min(N, 6 std + 1)``
   made odd, zero padding), clipped at 0 and row-normalised; class-token row and column are 0.
5. The final last block (:func:`resclip_attention`): for every logit map ``L`` of the base's attention (q-k for CLIP,
   q-q for ClearCLIP, k-k for NACLIP, q-q and k-k for SCLIP),
   ``L' = tau_sfr ((1 - lambda_sfr) L + lambda_sfr SFR / max SFR)`` with the scaled SFR in float16, then the base's
   bias (NACLIP's neighbourhood prior) and the softmaxes summed: ``A``; then
   ``A' = tau_rcs ((1 - lambda_rcs) A + lambda_rcs RCS)``; the block keeps or drops residual and FFN as the base does.

Official quirks kept: the attention rows sum to ``tau_rcs`` (not 1); SFR categories are queries, not classes; the
path check of a pair with ``steps < max_steps`` only follows the first ``steps / max_steps`` of the line (its
interpolation points are shared by all pairs); the Gaussian blur runs along the flattened rows, across grid rows; the
float16 rounding of the scaled SFR. The official class cannot switch RCS or SFR off (``self.use_rcs=use_rcs,``
makes a truthy tuple); here ``rcs`` and ``sfr`` are real switches (on by default). The official code uses one
``logit_scale`` for the temp pass and the final softmax; here the temp pass has its own option
(``temp_logit_scale``, 40 as in every official config), so ``--logit-scale`` changes only the final softmax.
A composition runs ResCLIP's harness (no crop padding, even on ClearCLIP). The official SFR width is NACLIP's
``gaussian_std``; here it is ``sfr_std`` (both 5 in the paper).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from vocabseg.errors import UsageError
from vocabseg.methods import presets as preset_data
from vocabseg.methods.base import Method, Preset
from vocabseg.methods.composition import Plugin, register_plugin
from vocabseg.methods.last_block.method import NACLIP, LastBlockMethod
from vocabseg.models.encoder import DenseEncoder
from vocabseg.pipeline import postprocess, timing
from vocabseg.pipeline.protocol import Protocol
from vocabseg.pipeline.windows import grid_logits_to_crop

#: The temp pass's PAMR, hard-coded in the official code.
TEMP_PAMR_STEPS = 10
TEMP_PAMR_DILATIONS = (8, 16)


# --- the mathematics --------------------------------------------------------------------------------------------

def plain_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """CLIP's attention ``softmax(s q k^T)`` per head: ``B,heads,T,hd -> B,heads,T,T``."""
    return torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2), dim=-1)


def temp_probabilities(logits: torch.Tensor, grid: tuple[int, int], crops: torch.Tensor, logit_scale: float
                       ) -> torch.Tensor:
    """SFR's temp prediction: patch cosines ``B,N,Q`` -> bilinear to the crop ``B,3,h,w`` -> PAMR guided by the crop
    -> ``softmax(logit_scale * .)`` over the queries: ``B,Q,h,w``."""
    maps = grid_logits_to_crop(logits, grid, crops.shape[-2:])
    maps = postprocess.pamr(crops, maps, TEMP_PAMR_STEPS, TEMP_PAMR_DILATIONS)
    return torch.softmax(maps * logit_scale, dim=1)


def patch_categories(probs: torch.Tensor, patch_size: int, threshold: float) -> torch.Tensor:
    """Per-patch category ``B,gh,gw`` of temp probabilities ``B,Q,h,w``: the argmax query per pixel (query 0 where
    its probability is below ``threshold``), then the most frequent one in each ``patch_size`` tile (the smallest on
    ties); pixels beyond whole tiles are dropped."""
    b, q, h, w = probs.shape
    labels = probs.argmax(dim=1)
    labels[probs.amax(dim=1) < threshold] = 0
    gh, gw = h // patch_size, w // patch_size
    tiles = labels[:, :gh * patch_size, :gw * patch_size].reshape(b, gh, patch_size, gw, patch_size)
    tiles = tiles.permute(0, 1, 3, 2, 4).reshape(b, gh * gw, patch_size * patch_size)
    counts = torch.zeros(b, gh * gw, q, dtype=torch.int32, device=probs.device)
    counts.scatter_add_(2, tiles, torch.ones_like(tiles, dtype=torch.int32))
    return counts.argmax(dim=-1).reshape(b, gh, gw)


def _pair_geometry(grid: tuple[int, int], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-major patch coordinates of every ordered pair (``P = N*N`` rows, ``start`` and ``end`` ``P,2``) and
    their Chebyshev distance ``steps`` ``P``."""
    gh, gw = grid
    index = torch.arange(gh * gw, device=device)
    coords = torch.stack([index // gw, index % gw], dim=-1)
    start = coords[:, None].expand(-1, gh * gw, -1).reshape(-1, 2)
    end = coords[None].expand(gh * gw, -1, -1).reshape(-1, 2)
    return start, end, (end - start).abs().amax(dim=-1)


@functools.lru_cache(maxsize=8)
def _path_points(grid: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official ``check_path`` geometry of a grid: the flat index (int32) of every pair's start ``P`` and of its
    path point at each step ``S,P`` (``S = max_steps + 1``), and the pair's ``steps`` ``P``."""
    gw = grid[1]
    start, end, steps = _pair_geometry(grid, device)
    max_steps = int(steps.max())
    t = torch.linspace(0, 1, max_steps + 1, device=device)
    points = []
    for s in range(max_steps + 1):
        point = (start * (1 - t[s]) + end * t[s]).round().long()
        points.append((point[:, 0] * gw + point[:, 1]).int())
    return (start[:, 0] * gw + start[:, 1]).int(), torch.stack(points), steps


def straight_path_validity(categories: torch.Tensor) -> torch.Tensor:
    """Official ``check_path``: for patch categories ``B,gh,gw``, whether the path from patch i towards patch j stays
    in i's category: ``B,N,N`` bool (``N = gh*gw``, row-major).

    The path points are ``round(p_i (1 - t) + p_j t)`` for ``t = s / max_steps`` (``max_steps`` = the largest
    Chebyshev distance of the grid), for ``s = 0 .. steps(i, j)``: a pair closer than ``max_steps`` checks only the
    first ``steps / max_steps`` of its segment (official behaviour). The geometry is cached per grid.
    """
    b, gh, gw = categories.shape
    starts, points, steps = _path_points((gh, gw), categories.device)
    flat = categories.reshape(b, gh * gw)
    start_values = flat.index_select(1, starts)
    valid = torch.ones_like(start_values, dtype=torch.bool)
    for s, point in enumerate(points):
        valid &= (flat.index_select(1, point) == start_values) | (steps < s)
    return valid.reshape(b, gh * gw, gh * gw)


def feedback_attention(categories: torch.Tensor, std: float = 5.0, delete_same_entity: bool = True, prefix: int = 1
                       ) -> torch.Tensor:
    """SFR's matrix ``B,P+N,P+N`` of patch categories ``B,gh,gw`` (official ``generate_attention_sfr``): same-category
    mask, path decay, 1-D Gaussian blur along each flattened row, ReLU, row normalisation; the rows and columns of the
    ``prefix`` tokens (the class token) are 0."""
    b, gh, gw = categories.shape
    n = gh * gw
    flat = categories.reshape(b, n)
    same = (flat[:, :, None] == flat[:, None, :]).float()
    if delete_same_entity:
        _, _, steps = _pair_geometry((gh, gw), categories.device)
        decay = torch.exp(-steps / int(steps.max())).reshape(n, n)
        same = torch.where(straight_path_validity(categories), same, same * decay)
    size = min(n, int(6 * std + 1))
    size = size if size % 2 == 1 else size + 1
    x = torch.arange(size, device=categories.device) - size // 2
    kernel = torch.exp(-(x**2) / (2 * std**2))
    kernel = kernel / kernel.sum()
    blurred = F.conv1d(same.reshape(b * n, 1, n), kernel.view(1, 1, -1), padding=size // 2).reshape(b, n, n)
    blurred = F.relu(blurred)
    normalised = blurred / (blurred.sum(dim=-1, keepdim=True) + 1e-8)
    return F.pad(normalised, (prefix, 0, prefix, 0))


def resclip_attention(logits: list[torch.Tensor], bias: torch.Tensor | None, rcs: torch.Tensor | None,
                      sfr: torch.Tensor | None, rcs_weights: tuple[float, float], sfr_weights: tuple[float, float]
                      ) -> torch.Tensor:
    """The last block's attention ``B,heads,T,T`` from the base's logit maps ``B,heads,T,T``, its bias ``T,T``, RCS
    ``B,heads,T,T`` and SFR ``B,T,T`` (either may be ``None``): SFR mixed into every logit map before the softmax,
    RCS mixed into the summed softmaxes (module docstring, step 5)."""
    if sfr is not None:
        tau, lam = sfr_weights
        scaled = (sfr / sfr.amax(dim=(-2, -1), keepdim=True)).to(torch.float16)[:, None]
        logits = [tau * ((1 - lam) * m + lam * scaled) for m in logits]
    if bias is not None:
        logits = [m + bias for m in logits]
    attn = sum(torch.softmax(m, dim=-1) for m in logits)
    if rcs is not None:
        tau, lam = rcs_weights
        attn = tau * ((1 - lam) * attn + lam * rcs)
    return attn


@dataclass
class ResCLIPTrace:
    """One ResCLIP crop pass: RCS ``B,heads,T,T``, temp cosines ``B,N,Q`` and probabilities ``B,Q,h,w``, patch
    categories ``B,gh,gw``, SFR ``B,T,T``, final attention ``B,heads,T,T``, tokens ``B,T,E`` (``ln_post @ proj``)."""

    grid: tuple[int, int]
    rcs: torch.Tensor | None
    temp_logits: torch.Tensor | None
    temp_probs: torch.Tensor | None
    categories: torch.Tensor | None
    sfr: torch.Tensor | None
    attention: torch.Tensor
    tokens: torch.Tensor


@register_plugin
@dataclass
class ResCLIP(Plugin):
    """ResCLIP on a last-block base: RCS (intermediate attention) and SFR (feedback from a first prediction)."""

    name: ClassVar[str] = "resclip"
    summary: ClassVar[str] = ("residual cross-correlation attention + semantic feedback refinement, a plug-in "
                              "(Yang et al. 2025)")
    default_protocol: ClassVar[Protocol] = preset_data.default_protocol(__package__, "resclip")
    presets: ClassVar[dict[str, Preset]] = preset_data.presets(__package__, "resclip")
    default_base: ClassVar[type[Method]] = NACLIP

    rcs: bool = True
    sfr: bool = True
    rcs_weights: tuple[float, float] = (2.0, 0.4)
    sfr_weights: tuple[float, float] = (1.8, 0.7)
    temp_thd: float = 0.25
    delete_same_entity: bool = True
    rcs_layers: tuple[int, ...] = (6, 7, 8, 9)
    sfr_std: float = 5.0
    temp_logit_scale: float = 40.0

    def __post_init__(self):
        for pair in ("rcs_weights", "sfr_weights"):
            if len(getattr(self, pair)) != 2:
                raise UsageError(f"{pair} is a pair (tau, lambda), e.g. 2.0,0.4 (got {getattr(self, pair)!r})")
        if self.sfr_std <= 0:
            raise UsageError(f"sfr_std must be positive (got {self.sfr_std})")
        super().__post_init__()

    @classmethod
    def check_base(cls, base: type[Method]) -> None:
        if not issubclass(base, LastBlockMethod) or base.attention_logits is LastBlockMethod.attention_logits:
            raise UsageError(f"resclip needs a base whose last-block attention is a sum of softmaxes (clip, sclip, "
                             f"clearclip, naclip); {base.name!r} is not")

    def trace(self, encoder: DenseEncoder, crops: torch.Tensor, text: torch.Tensor) -> ResCLIPTrace:
        """Every step of one pass over normalised crops ``B,3,h,w`` with the classifier ``text`` ``Q,E``."""
        grid = encoder.grid(*crops.shape[-2:])
        x, rcs = self._trunk(encoder, crops)
        temp_logits = temp_probs = categories = sfr = None
        if self.sfr:
            temp_tokens, _ = self._last_block(encoder, x, grid, rcs, None)
            temp_logits = F.normalize(temp_tokens[:, encoder.prefix_tokens:], dim=-1) @ text.to(temp_tokens.dtype).T
            with timing.stage("resclip temp PAMR"):
                temp_probs = temp_probabilities(temp_logits, grid, crops, self.temp_logit_scale)
            with timing.stage("resclip SFR"):
                categories = patch_categories(temp_probs, encoder.patch_size, self.temp_thd)
                sfr = feedback_attention(categories, self.sfr_std, self.delete_same_entity, encoder.prefix_tokens)
        tokens, attention = self._last_block(encoder, x, grid, rcs, sfr)
        return ResCLIPTrace(grid, rcs, temp_logits, temp_probs, categories, sfr, attention, tokens)

    def _trunk(self, encoder: DenseEncoder, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Blocks ``1 .. L-1`` on normalised crops: the tokens ``B,T,C`` entering the last block and RCS (the mean
        plain attention of ``rcs_layers``, ``B,heads,T,T``; ``None`` when ``rcs`` is off)."""
        last = encoder.num_blocks - 1
        bad = [layer for layer in self.rcs_layers if not 1 <= layer <= last]
        if bad:
            raise UsageError(f"rcs_layers are 1-based blocks before the last one (1..{last}); got {bad}")
        recorded = {layer - 1 for layer in self.rcs_layers} if self.rcs else set()
        x = encoder.embed(crops)
        maps = []
        for index in range(last):
            if index not in recorded:
                x = encoder.block(index, x)
                continue
            q, k, v = encoder.qkv(index, x)
            attn = plain_attention(q, k)
            maps.append(attn)
            x = encoder.ffn(index, x + encoder.attention_out(index, attn @ v))
        return x, torch.stack(maps).mean(dim=0) if maps else None

    def _last_block(self, encoder, x, grid, rcs, sfr) -> tuple[torch.Tensor, torch.Tensor]:
        """The base's last block with ResCLIP's attention: tokens ``B,T,E`` and the attention ``B,heads,T,T``."""
        base: LastBlockMethod = self.base
        last = encoder.num_blocks - 1
        q, k, v = encoder.qkv(last, x)
        bias = base.attention_bias(grid, encoder.prefix_tokens, x.device)
        attn = resclip_attention(base.attention_logits(q, k), bias, rcs, sfr, self.rcs_weights, self.sfr_weights)
        out = encoder.attention_out(last, attn @ v)
        x = x + out if base.keep_residual else out
        x = encoder.ffn(last, x) if base.keep_ffn else x
        return encoder.head(x), attn

    def text_patch_features(self, models, crops, text):
        encoder = models.clip.image
        trace = self.trace(encoder, crops, text)
        return F.normalize(trace.tokens[:, encoder.prefix_tokens:], dim=-1), trace.grid
