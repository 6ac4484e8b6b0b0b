"""PEARL (Pei et al., CVPR 2026): Procrustes alignment + text-aware Laplacian propagation, as its official code
computes it.

* Procrustes alignment (PA), in the last block, per head (``arch='reduced'``: attention only, no residual, no FFN):
  q and k (``ln_1`` input) are centred on their means weighted by ``|q_t|`` (class token weight 0); the rotation
  ``R`` = polar factor of ``M = K_c^T Q_c`` by 5 coupled Newton-Schulz steps (:func:`polar_factor`); attention
  ``softmax(s Q (K R)^T + 0.08 s K_c K_c^T)`` on the block's V. Features ``normalize(ln_post(.) @ proj)``.
* Text-aware Laplacian propagation (TLP), on the merged raw logits at the original size
  (:func:`text_aware_propagation`): average-pooled to a grid of about 80 cells per side, a confidence- and
  text-weighted data term and 4-neighbour edges from the image's luminance gradients, solved by 25
  conjugate-gradient steps, upsampled back. Then the common softmax and thresholds (and PAMR if asked, after TLP; no
  PEARL config enables PAMR, so that order is not checked against the official code).
  ``out.logits`` are the raw logits before TLP (like before PAMR); ``out.scores`` and ``out.labels`` come after it.

Quirks of the official code kept as the default (``../shared/oracle/pearl/README.md``):

* The TLP softmax has no temperature (``propagation_tau=1``): over raw cosines it is nearly uniform, so the
  confidence floor makes the data weight (almost) constant. ``propagation_tau=0.025`` (= 1/40, the logit scale)
  gives it the intended spread.
* ``einsum('cc,bcij->bcij', S, p)`` reads only the diagonal of the text affinity ``S``, so the "text-aware"
  agreement and edge gains are ``sum_c S_cc p_c p'_c``; ``full_text_affinity=true`` uses ``p^T S p'``.
* R is computed from centred q/k but rotates the uncentred keys; the k-k term uses centred keys.
* The CG starts at the pooled logits (not 0); inner products run over all maps together.

Options: ``use_kk``, ``alpha_kk``, ``align_solver`` (``polar`` or the exact ``svd``), ``polar_iters``,
``propagation`` (TLP on/off: the official ``use_prop``), ``propagation_grid``, ``propagation_tau``,
``full_text_affinity``.

Presets (this package's ``presets.toml``): short side 336 in every PEARL config; VOC21 (whole image, ``prob_thd``
0.1) and PC59 (crop 224 / stride 112) checked by the oracle. The other benchmarks follow NACLIP's configs, which
PEARL's code descends from (whole image on VOC20; ``prob_thd`` 0.1 on PC60 and COCO-Object), τ 40, SCLIP's name
lists. PEARL runs on image encoders with or without a class token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from vocabseg.methods import presets as preset_data
from vocabseg.methods.base import Preset
from vocabseg.methods.last_block.method import LastBlockMethod
from vocabseg.methods.registry import register
from vocabseg.pipeline import timing
from vocabseg.pipeline.protocol import Protocol
from vocabseg.pipeline.windows import upsample

# --- Procrustes alignment ---------------------------------------------------------------------------------------

def weighted_centre(q: torch.Tensor, k: torch.Tensor, prefix: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``q``, ``k`` (``...,T,d``) centred on their means weighted by ``|q_t|`` (normalised, ``+1e-6``); the first
    ``prefix`` tokens (the class token) get weight 0."""
    weight = q.norm(dim=-1, keepdim=True)
    weight[..., :prefix, :] = 0.0
    weight = weight / (weight.sum(dim=-2, keepdim=True) + 1e-6)
    return q - (weight * q).sum(dim=-2, keepdim=True), k - (weight * k).sum(dim=-2, keepdim=True)


def polar_factor(m: torch.Tensor, iterations: int = 5, eps: float = 1e-6) -> torch.Tensor:
    """Approximate orthogonal polar factor ``M (M^T M)^{-1/2}`` of ``...,d,d`` by coupled Newton-Schulz steps.

    ``A = M^T M`` is divided by its Frobenius norm (at least ``eps``) and ``eps I`` is added; ``iterations`` steps of
    ``T = (3I - ZY) / 2, Y <- YT, Z <- TZ`` from ``Y = A, Z = I`` give ``Z ~ A^{-1/2}`` (not converged for small
    singular values after 5 steps, as in the official code).
    """
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device).expand_as(m)
    a = m.transpose(-1, -2) @ m
    norm = a.flatten(-2).norm(dim=-1).clamp_min(eps)[..., None, None]
    y, z = a / norm + eps * eye, eye
    for _ in range(iterations):
        t = 0.5 * (3.0 * eye - z @ y)
        y, z = y @ t, t @ z
    return m @ (z / norm.sqrt())


def procrustes_rotation(q_centred: torch.Tensor, k_centred: torch.Tensor, solver: str = "polar",
                        iterations: int = 5) -> torch.Tensor:
    """Rotation ``R`` (``...,d,d``) taking keys toward queries: the polar factor of ``M = K_c^T Q_c``, by
    :func:`polar_factor` or exactly (``solver="svd"``: ``U V^T``)."""
    m = k_centred.transpose(-1, -2) @ q_centred
    if solver == "svd":
        u, _, vh = torch.linalg.svd(m, full_matrices=False)
        return u @ vh
    return polar_factor(m, iterations)


def pearl_attention(q: torch.Tensor, k: torch.Tensor, alpha_kk: float = 0.08, use_kk: bool = True,
                    solver: str = "polar", iterations: int = 5, prefix: int = 1) -> torch.Tensor:
    """PEARL's last-block attention ``softmax(s Q (K R)^T + alpha s K_c K_c^T)`` of ``B,heads,T,d`` -> ``B,heads,T,T``.

    ``R`` comes from the weighted-centred ``Q_c, K_c`` (:func:`weighted_centre`, the ``prefix`` tokens before the
    patches excluded) but rotates
    the *uncentred* keys; the k-k term uses the centred keys. Computed in float32 (autocast off), as the official
    code does.
    """
    with torch.autocast(q.device.type, enabled=False):  # float32 even under the harness's autocast
        q, k = q.float(), k.float()
        scale = q.shape[-1] ** -0.5
        q_c, k_c = weighted_centre(q, k, prefix)
        logits = (q * scale) @ (k @ procrustes_rotation(q_c, k_c, solver, iterations)).transpose(-1, -2)
        if use_kk:
            logits = logits + alpha_kk * ((k_c @ k_c.transpose(-1, -2)) * scale)
        return torch.softmax(logits, dim=-1)


# --- text-aware Laplacian propagation (TLP) ---------------------------------------------------------------------

#: Luminance weights TLP applies to the (normalised) image channels.
LUMA = (0.299, 0.587, 0.114)


def text_affinity(text: torch.Tensor, tau: float = 0.5, diag_boost: float = 10.0) -> torch.Tensor:
    """``S = softmax(cos(t_a, t_b) / tau) + diag_boost I``, rows normalised to sum 1: ``Q,E -> Q,Q``."""
    unit = F.normalize(text.float(), dim=-1)
    s = torch.softmax(unit @ unit.T / tau, dim=-1) + diag_boost * torch.eye(len(unit), device=text.device)
    return s / s.sum(dim=-1, keepdim=True)


def pool_size(height: int, width: int, grid: int = 80) -> tuple[int, int]:
    """Average-pooling kernel of TLP's small grid: ``round(H / grid), round(W / grid)`` (Python rounding, at
    least 1)."""
    return max(1, round(height / grid)), max(1, round(width / grid))


def text_gain(p: torch.Tensor, p_other: torch.Tensor, affinity: torch.Tensor, full: bool = False) -> torch.Tensor:
    """Text-weighted agreement of two probability maps ``Q,h,w``: ``sum_c S_cc p_c p'_c`` (the official
    ``einsum('cc,...')`` reads only the diagonal of ``S``) or, with ``full``, ``p^T S p'`` -> ``h,w``."""
    if full:
        return (p * torch.einsum("ab,bhw->ahw", affinity, p_other)).sum(dim=0)
    return (affinity.diagonal()[:, None, None] * p * p_other).sum(dim=0)


def edge_weights(luminance: torch.Tensor, p: torch.Tensor, affinity: torch.Tensor, strength: float = 5.0,
                 full: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical edge weights of the ``h,w`` grid graph, each ``h,w`` (the weight of the edge to the
    left / upper neighbour; column / row 0 = 1, unused).

    ``w = min(1, exp(-strength * g / (mean g + 1e-6)) * (1 + gain))`` with ``g`` the absolute luminance difference
    (its mean taken per direction) and ``gain`` the :func:`text_gain` of the two pixels' probabilities.
    """
    weights = []
    for dim in (1, 0):
        grad = luminance.diff(dim=dim).abs()
        near = p.narrow(dim + 1, 1, p.shape[dim + 1] - 1)
        far = p.narrow(dim + 1, 0, p.shape[dim + 1] - 1)
        w = (torch.exp(-strength * grad / (grad.mean() + 1e-6)) * (1 + text_gain(near, far, affinity, full)))
        weights.append(F.pad(w.clamp(max=1.0), (1, 0) if dim == 1 else (0, 0, 1, 0), value=1.0))
    return weights[0], weights[1]


def graph_laplacian(x: torch.Tensor, w_h: torch.Tensor, w_v: torch.Tensor) -> torch.Tensor:
    """``(L x)_i = sum_j w_ij (x_i - x_j)`` over the 4-neighbourhood of ``...,h,w`` maps (weights as
    :func:`edge_weights` gives them)."""
    out = torch.zeros_like(x)
    flow = w_h[:, 1:] * x.diff(dim=-1)
    out[..., 1:] += flow
    out[..., :-1] -= flow
    flow = w_v[1:] * x.diff(dim=-2)
    out[..., 1:, :] += flow
    out[..., :-1, :] -= flow
    return out


def conjugate_gradient(operator, rhs: torch.Tensor, start: torch.Tensor, iterations: int = 25, eps: float = 1e-6
                       ) -> torch.Tensor:
    """``iterations`` conjugate-gradient steps on ``A x = rhs`` from ``start``; inner products over the whole tensor
    (all maps together), denominators at least ``eps``."""
    x = start
    r = rhs - operator(x)
    p = r
    rs = (r * r).sum()
    for _ in range(iterations):
        ap = operator(p)
        alpha = rs / (p * ap).sum().clamp_min(eps)
        x = x + alpha * p
        r = r - alpha * ap
        rs_next = (r * r).sum()
        p = r + (rs_next / rs.clamp_min(eps)) * p
        rs = rs_next
    return x


def text_aware_propagation(logits: torch.Tensor, image: torch.Tensor, affinity: torch.Tensor, grid: int = 80,
                           tau: float = 1.0, strength: float = 5.0, iterations: int = 25, min_confidence: float = 0.05,
                           full_affinity: bool = False) -> dict[str, torch.Tensor]:
    """TLP of raw logits ``Q,H,W`` guided by the normalised image ``3,H,W`` and the text affinity ``Q,Q``.

    On the average-pooled grid (:func:`pool_size`): ``p = softmax(log_s / tau)`` over queries, ``agree`` =
    :func:`text_gain` of ``p`` with itself, data weight ``C = max(max_c p_c, min_confidence)^2 (1 + agree)``; the
    solution of ``(C + L) F = C log_s`` (:func:`graph_laplacian`, :func:`edge_weights` on the pooled luminance) by
    :func:`conjugate_gradient` from ``log_s``, upsampled bilinearly to ``H,W``. Returns ``logits`` (``Q,H,W``) and the
    grid tensors ``solution``, ``confidence``, ``agree``, ``w_h``, ``w_v``.
    """
    size = pool_size(*logits.shape[-2:], grid)
    pooled = F.avg_pool2d(logits[None].float(), size)[0]
    luminance = sum(weight * channel for weight, channel in zip(LUMA, F.avg_pool2d(image[None].float(), size)[0],
                                                                 strict=True))
    p = torch.softmax(pooled / tau, dim=0)
    agree = text_gain(p, p, affinity, full_affinity)
    confidence = p.amax(dim=0).clamp(min=min_confidence).square() * (1 + agree)
    w_h, w_v = edge_weights(luminance, p, affinity, strength, full_affinity)
    solution = conjugate_gradient(lambda f: confidence * f + graph_laplacian(f, w_h, w_v), confidence * pooled,
                                  pooled, iterations)
    return {"logits": upsample(solution, tuple(logits.shape[-2:])), "solution": solution,
            "confidence": confidence, "agree": agree, "w_h": w_h, "w_v": w_v}


@register
@dataclass
class PEARL(LastBlockMethod):
    """PEARL: Procrustes-aligned last-block attention (no residual, no FFN) and text-aware Laplacian propagation.

    Runs on encoders with or without a class token (the weighted centring skips the tokens before the patches)."""

    name: ClassVar[str] = "pearl"
    summary: ClassVar[str] = ("Procrustes key rotation in the last attention + text-aware Laplacian propagation "
                              "(Pei et al. 2026)")
    default_protocol: ClassVar[Protocol] = preset_data.default_protocol(__package__, "pearl")
    presets: ClassVar[dict[str, Preset]] = preset_data.presets(__package__, "pearl")
    keep_residual: ClassVar[bool] = False
    keep_ffn: ClassVar[bool] = False

    use_kk: bool = True
    alpha_kk: float = 0.08
    align_solver: Literal["polar", "svd"] = "polar"
    polar_iters: int = 5
    propagation: bool = True
    propagation_grid: int = 80
    propagation_tau: float = 1.0
    full_text_affinity: bool = False

    def attention(self, q, k, v, grid):
        weights = pearl_attention(q, k, self.alpha_kk, self.use_kk, self.align_solver, self.polar_iters,
                                  prefix=k.shape[-2] - grid[0] * grid[1])
        return (weights @ v.float()).to(v.dtype)

    def scores_and_labels(self, logits, prepared, dense, classifier, protocol):
        """TLP (when ``propagation`` is on) of the raw logits, then the common PAMR, softmax and thresholds."""
        if self.propagation:
            with timing.stage("propagation"):
                image = upsample(prepared.input[0], tuple(logits.shape[-2:]))
                logits = text_aware_propagation(
                    logits, image, text_affinity(classifier.embeddings), self.propagation_grid,
                    self.propagation_tau, full_affinity=self.full_text_affinity)["logits"]
        return super().scores_and_labels(logits, prepared, dense, classifier, protocol)
