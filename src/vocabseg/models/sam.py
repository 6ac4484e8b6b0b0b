"""SAM (Segment Anything) and SAM 2 as helper models: the official packages' modules, safe loading, dense primitives.

The network is the ``segment_anything`` package's own ``Sam`` (image encoder, prompt encoder, mask decoder), built
from the checkpoint's tensor shapes, so every number equals the official code's. What methods read beyond the
package's forward (the last block's attention and values, for Trident) is computed here from the block's own
parameters.

Weights (:func:`load_sam`, model kind ``sam`` of :mod:`vocabseg.models.factory`: ``--model sam=WEIGHTS``):

* a tag: ``vit_b`` (the default), ``vit_l``, ``vit_h`` (the official model types). Read from torch hub's checkpoint
  folder (the official ``sam_vit_*.pth``) or the Hugging Face cache (``facebook/sam-vit-*``), else downloaded
  (Hugging Face first, then the official file) and cached;
* a local file in any of these layouts: the official checkpoint (``image_encoder.*``, ``prompt_encoder.*``,
  ``mask_decoder.*``), an image-encoder-only state dict (keys without the ``image_encoder.`` prefix, also timm's
  ``samvit`` layout) or the Hugging Face ``transformers`` ``SamModel`` layout (``vision_encoder.*``, ...;
  ``model.safetensors`` / ``pytorch_model.bin``), ``.pth``/``.pt``/``.bin``/``.safetensors``.

SAM 2 (:func:`load_sam2`, model kind ``sam2``, for automatic masks) is the optional ``sam2`` package's own model,
built from its configs with the official checkpoints (tags: the Hugging Face repositories ``facebook/sam2-hiera-*``
and ``facebook/sam2.1-hiera-*``, which hold the official files).

An encoder-only checkpoint has no prompt encoder / mask decoder: :attr:`SamModel.has_decoder` is False and the
decoder-based features (Trident's refinement, automatic masks) refuse to run. Nothing is unpickled beyond tensors.

Layouts: SAM input ``B,3,S,S`` (``S = 1024``: normalised, zero-padded bottom/right); encoder tokens ``B,g,g,C``
(``g = S / 16``) channels last, as the package keeps them; per-head tensors ``B,heads,N,head_dim`` with ``N = g*g``
in row-major order.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vocabseg.errors import UsageError
from vocabseg.models.checkpoints import (
    WeightsError,
    fetch_hub_file,
    hub_cache_dir,
    missing_weights_help,
    read_state_dict,
    state_fingerprint,
)

#: SAM's pixel statistics (RGB, 0..255).
SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)

#: Official model types -> (official checkpoint URL, Hugging Face repository in ``transformers`` layout).
SAM_TAGS = {
    "vit_b": ("https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth", "facebook/sam-vit-base"),
    "vit_l": ("https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth", "facebook/sam-vit-large"),
    "vit_h": ("https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth", "facebook/sam-vit-huge"),
}


@dataclass(frozen=True)
class SamConfig:
    """What the tensor shapes of a checkpoint say about the image encoder."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int
    patch_size: int = 16
    img_size: int = 1024
    out_chans: int = 256
    has_decoder: bool = True

    def describe(self) -> str:
        size = {768: "B", 1024: "L", 1280: "H"}.get(self.embed_dim, f"w{self.embed_dim}-d{self.depth}")
        return f"SAM ViT-{size}" + ("" if self.has_decoder else " (image encoder only)")


# --- layouts ----------------------------------------------------------------------------------------------------

#: ``transformers`` SamModel key fragments -> the official ones, applied in order (regular expressions).
_HF_TO_OFFICIAL = [
    (r"^vision_encoder\.", "image_encoder."),
    (r"^shared_image_embedding\.positional_embedding$", "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    (r"^prompt_encoder\.shared_embedding\.positional_embedding$",
     "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    (r"\.patch_embed\.projection\.", ".patch_embed.proj."),
    (r"^image_encoder\.layers\.", "image_encoder.blocks."),
    (r"\.neck\.conv1\.", ".neck.0."),
    (r"\.neck\.layer_norm1\.", ".neck.1."),
    (r"\.neck\.conv2\.", ".neck.2."),
    (r"\.neck\.layer_norm2\.", ".neck.3."),
    (r"\.mask_embed\.conv1\.", ".mask_downscaling.0."),
    (r"\.mask_embed\.layer_norm1\.", ".mask_downscaling.1."),
    (r"\.mask_embed\.conv2\.", ".mask_downscaling.3."),
    (r"\.mask_embed\.layer_norm2\.", ".mask_downscaling.4."),
    (r"\.mask_embed\.conv3\.", ".mask_downscaling.6."),
    (r"\.point_embed\.", ".point_embeddings."),
    (r"\.upscale_conv1\.", ".output_upscaling.0."),
    (r"\.upscale_layer_norm\.", ".output_upscaling.1."),
    (r"\.upscale_conv2\.", ".output_upscaling.3."),
    (r"\.layer_norm_final_attn\.", ".norm_final_attn."),
    (r"\.layer_norm(\d)\.", r".norm\1."),
    # the three-layer MLP heads: proj_in, layers.0, proj_out -> layers.0, layers.1, layers.2
    (r"(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.0\.", r"\1.layers.1."),
    (r"(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.proj_in\.", r"\1.layers.0."),
    (r"(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.proj_out\.", r"\1.layers.2."),
]


def to_official_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A SAM state dict in the official key layout, from the official, encoder-only or ``transformers`` layout."""
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith(("vision_encoder.", "shared_image_embedding.")) for k in state):
        converted = {}
        for key, value in state.items():
            for pattern, replacement in _HF_TO_OFFICIAL:
                key = re.sub(pattern, replacement, key)
            converted[key] = value
        state = converted
    elif not any(k.startswith("image_encoder.") for k in state):
        state = {f"image_encoder.{k}": v for k, v in state.items()}
    # timm's samvit names the MLP layers fc1/fc2 where segment-anything has lin1/lin2
    state = {re.sub(r"^(image_encoder\.blocks\.\d+\.mlp\.)fc([12])\.", r"\1lin\2.", k): v for k, v in state.items()}
    return {k: v for k, v in state.items() if k not in ("pixel_mean", "pixel_std")}


def infer_config(state: dict[str, torch.Tensor]) -> SamConfig:
    """The image encoder's architecture from an official-layout state dict.

    Heads follow from the relative-position tables (``2g - 1`` rows, ``head_dim`` columns): global blocks have
    ``2 * img_size / patch - 1`` rows, windowed ones ``2 * window - 1``.
    """
    required = ("image_encoder.pos_embed", "image_encoder.patch_embed.proj.weight",
                "image_encoder.blocks.0.attn.rel_pos_h", "image_encoder.neck.0.weight")
    missing = [k for k in required if k not in state]
    if missing:
        raise WeightsError(f"not a SAM image encoder with relative positions (missing {', '.join(missing)}); expected "
                           "the official segment-anything layout, an encoder-only state dict or transformers' SamModel")
    depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
    patch = state["image_encoder.patch_embed.proj.weight"]
    grid = state["image_encoder.pos_embed"].shape[1]
    rel_rows = [state[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0] for i in range(depth)]
    global_rows = 2 * grid - 1
    windows = {(rows + 1) // 2 for rows in rel_rows if rows != global_rows}
    head_dim = state["image_encoder.blocks.0.attn.rel_pos_h"].shape[1]
    return SamConfig(
        embed_dim=patch.shape[0], depth=depth, num_heads=patch.shape[0] // head_dim,
        global_attn_indexes=tuple(i for i, rows in enumerate(rel_rows) if rows == global_rows),
        window_size=windows.pop() if windows else 0, patch_size=patch.shape[-1], img_size=grid * patch.shape[-1],
        out_chans=state["image_encoder.neck.0.weight"].shape[0],
        has_decoder=any(k.startswith("mask_decoder.") for k in state))


def build_model(config: SamConfig):
    """An empty ``segment_anything`` ``Sam`` of ``config`` (eval mode), built as the package's ``_build_sam``."""
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = config.img_size // config.patch_size
    encoder = ImageEncoderViT(
        depth=config.depth, embed_dim=config.embed_dim, img_size=config.img_size, mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=config.num_heads, patch_size=config.patch_size,
        qkv_bias=True, use_rel_pos=True, global_attn_indexes=config.global_attn_indexes,
        window_size=config.window_size, out_chans=config.out_chans)
    prompt = PromptEncoder(embed_dim=config.out_chans, image_embedding_size=(grid, grid),
                           input_image_size=(config.img_size, config.img_size), mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
        depth=2, embedding_dim=config.out_chans, mlp_dim=2048, num_heads=8), transformer_dim=config.out_chans,
        iou_head_depth=3, iou_head_hidden_dim=256)
    return Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder,
               pixel_mean=list(SAM_MEAN), pixel_std=list(SAM_STD)).eval()


# --- the model --------------------------------------------------------------------------------------------------

def resize_longest_side(image: np.ndarray, size: int) -> np.ndarray:
    """SAM's ``ResizeLongestSide``: uint8 ``H,W,3`` -> longest side ``size`` (PIL bilinear, with antialiasing),
    the other side ``int(side * size / long + 0.5)``."""
    from segment_anything.utils.transforms import ResizeLongestSide

    return ResizeLongestSide(size).apply_image(image)


class SamModel:
    """A SAM model and the pieces helper-model methods use: preprocessing, encoder stages, the last block's q/k/v
    and attention logits, neck; plus the prompt encoder / mask decoder (``model.prompt_encoder``,
    ``model.mask_decoder``) when the checkpoint has them."""

    def __init__(self, model, config: SamConfig, name: str = "", source: str = ""):
        self.model = model.eval()
        self.config = config
        self.name = name or config.describe()
        self.source = source
        self.encoder = model.image_encoder
        self.blocks = list(self.encoder.blocks)
        self.num_heads = config.num_heads
        self.patch_size = config.patch_size
        self.image_size = config.img_size

    @property
    def device(self) -> torch.device:
        return self.encoder.pos_embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.pos_embed.dtype

    @property
    def has_decoder(self) -> bool:
        return self.config.has_decoder

    def fingerprint(self) -> str:
        """A content hash of the weights, to key caches of this model's outputs."""
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = state_fingerprint(self.model.state_dict().items())
        return self._fingerprint

    def require_decoder(self, purpose: str) -> None:
        if not self.has_decoder:
            raise UsageError(f"{purpose} needs SAM's prompt encoder and mask decoder, but {self.source or self.name} "
                             "holds only the image encoder; give a full SAM checkpoint (e.g. --model sam=vit_b)")

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """uint8 ``H,W,3`` RGB -> SAM input ``1,3,S,S`` and the resized size ``(h, w)`` before padding
        (``SamPredictor.set_image``: longest side to ``S``, normalised, zero-padded bottom/right)."""
        resized = resize_longest_side(image, self.image_size)
        x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1)[None].float()
        return self.model.preprocess(x), tuple(resized.shape[:2])

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding + absolute positions: ``B,3,S,S -> B,g,g,C``."""
        return self.encoder.patch_embed(images.to(self.dtype)) + self.encoder.pos_embed

    def run_blocks(self, x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Run blocks ``start .. end-1`` unchanged (windowed or global, as configured)."""
        for block in self.blocks[start:end]:
            x = block(x)
        return x

    def qkv(self, index: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of a global block ``index`` from ``norm1(x)`` (``B,g,g,C``), each ``B,heads,N,head_dim``."""
        block = self.blocks[index]
        if block.window_size:
            raise UsageError(f"SAM block {index} uses windowed attention; only global blocks give full attention maps")
        b, gh, gw, _ = x.shape
        qkv = block.attn.qkv(block.norm1(x)).reshape(b, gh * gw, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def attention_logits(self, index: int, q: torch.Tensor, k: torch.Tensor, grid: tuple[int, int],
                         rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Pre-softmax attention of global block ``index``: ``scale q k^T`` plus the decomposed relative-position
        terms (SAM's ``add_decomposed_rel_pos``), ``B,heads,R,N``.

        ``q`` ``B,heads,N,hd`` and ``k`` on the ``grid``; ``rows=(rh, rw)`` keeps only the queries of the top-left
        ``rh x rw`` cells (row-major), the keys stay complete.
        """
        from segment_anything.modeling.image_encoder import get_rel_pos

        attn = self.blocks[index].attn
        gh, gw = grid
        rh, rw = rows or grid
        b, heads, _, hd = q.shape
        q = q.reshape(b, heads, gh, gw, hd)[:, :, :rh, :rw]
        logits = (q * attn.scale).reshape(b, heads, rh * rw, hd) @ k.transpose(-1, -2)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", q, get_rel_pos(gh, gh, attn.rel_pos_h)[:rh])
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", q, get_rel_pos(gw, gw, attn.rel_pos_w)[:rw])
        logits = logits.view(b, heads, rh, rw, gh, gw) + rel_h[..., :, None] + rel_w[..., None, :]
        return logits.view(b, heads, rh * rw, gh * gw)

    def finish_block(self, index: int, x: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """Block ``index``'s output from its input ``x`` (``B,g,g,C``) and head outputs ``A V`` (``B,heads,N,hd``):
        projection, residual, MLP."""
        block = self.blocks[index]
        b, gh, gw, c = x.shape
        merged = heads.transpose(1, 2).reshape(b, gh, gw, c)
        x = x + block.attn.proj(merged)
        return x + block.mlp(block.norm2(x))

    def neck(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's neck: ``B,g,g,C -> B,out_chans,g,g`` (the image embedding the mask decoder reads)."""
        return self.encoder.neck(x.permute(0, 3, 1, 2))


# --- weights ----------------------------------------------------------------------------------------------------

def _help(tag: str) -> str:
    return missing_weights_help("SAM", tag, "a checkpoint (official sam_vit_b_01ec64.pth, or transformers' "
                                "model.safetensors of facebook/sam-vit-base)", "sam")


def read_sam(path: str | os.PathLike, source: str = "") -> SamModel:
    """A :class:`SamModel` from a checkpoint file in any supported layout (float32, CPU)."""
    path = Path(path)
    state = to_official_layout(read_state_dict(path))
    config = infer_config(state)
    model = build_model(config)
    expected = set(model.state_dict())
    if not config.has_decoder:
        expected = {k for k in expected if k.startswith("image_encoder.")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        raise WeightsError(f"{path} does not fit the inferred {config.describe()}: "
                           f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    return SamModel(model, config, source=source or str(path.resolve()))


#: The SAM a ``sam`` model slot loads when none is named.
DEFAULT_SAM = "vit_b"


def load_sam(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> SamModel:
    """The SAM of ``weights`` (a tag of :data:`SAM_TAGS`, a checkpoint file, ``None``: :data:`DEFAULT_SAM`) on
    ``device``. Load it through :func:`vocabseg.models.factory.load_model` (kind ``sam``) to share it.
    Raises :class:`~vocabseg.models.checkpoints.WeightsError` with instructions when the weights are missing."""
    weights = str(DEFAULT_SAM if weights is None else weights)
    path = Path(os.path.expanduser(weights))
    if path.is_file():
        sam = read_sam(path)
    elif weights in SAM_TAGS:
        url, hub_id = SAM_TAGS[weights]
        sam = read_sam(fetch_hub_file(hub_id, ["model.safetensors"], _help(weights), url=url),
                       source=f"{weights} (segment-anything)")
    else:
        raise WeightsError(f"Unknown SAM weights {weights!r}: give a checkpoint file or one of {', '.join(SAM_TAGS)}.")
    sam.model.to(device)
    return sam


# --- SAM 2 ------------------------------------------------------------------------------------------------------

#: The SAM 2 a ``sam2`` model slot (and the ``sam2`` mask source) loads when none is named: CorrCLIP's.
DEFAULT_SAM2 = "facebook/sam2-hiera-large"


@dataclass(eq=False)
class Sam2Model:
    """The official ``sam2`` package's model (``SAM2Base``) with its name and weights source."""

    model: torch.nn.Module
    name: str
    source: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def fingerprint(self) -> str:
        """A content hash of the weights, to key caches of this model's outputs."""
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = state_fingerprint(self.model.state_dict().items())
        return self._fingerprint


def _sam2_files() -> dict[str, tuple[str, str]]:
    """Hugging Face repositories of the official SAM 2 / 2.1 checkpoints -> (package config, file name)."""
    from sam2.build_sam import HF_MODEL_ID_TO_FILENAMES

    return HF_MODEL_ID_TO_FILENAMES


def _sam2_config(path: Path, config: str | None) -> str:
    if config:
        return config
    for known_config, filename in _sam2_files().values():
        if path.name == filename:
            return known_config
    raise WeightsError(f"Cannot tell the SAM 2 architecture of {path.name}; keep the official file name "
                       f"(e.g. sam2.1_hiera_large.pt) or pass its config as the architecture (e.g. "
                       f"configs/sam2.1/sam2.1_hiera_l.yaml)")


def _fetch_sam2(repo: str) -> Path:
    """The official SAM 2 checkpoint of a Hugging Face repository: the cache first, then a download."""
    filename = _sam2_files()[repo][1]
    help_text = (f"Could not get the SAM 2 weights '{repo}'.\n  - On a machine with internet they download once "
                 f"to the Hugging Face cache ({hub_cache_dir()}); copy that cache here, or\n  - download {filename} "
                 f"and pass its path (--model sam2=PATH; Python: models={{'sam2': PATH}}).")
    return fetch_hub_file(repo, [filename], help_text)


def load_sam2(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
              arch: str | None = None) -> Sam2Model:
    """The official ``sam2`` model (eval mode, no mask post-processing, as CorrCLIP builds it) of ``weights``: a
    Hugging Face repository of the official checkpoints (``facebook/sam2-hiera-large`` (``None``),
    ``facebook/sam2.1-hiera-base-plus``, ...) or a checkpoint file (official layout ``{"model": state_dict}``;
    ``arch`` names its package config when the file name is not the official one). Load it through
    :func:`vocabseg.models.factory.load_model` (kind ``sam2``) to share it."""
    try:
        from sam2.build_sam import build_sam2
    except ImportError:
        raise UsageError("SAM 2 needs the optional 'sam2' package: pip install 'vocabseg[sam2]'") from None

    weights = str(DEFAULT_SAM2 if weights is None else weights)
    path = Path(os.path.expanduser(weights))
    if path.is_file():
        config, source = _sam2_config(path, arch), str(path.resolve())
    elif weights in _sam2_files():
        config, source = arch or _sam2_files()[weights][0], weights
        path = _fetch_sam2(weights)
    else:
        raise WeightsError(f"Unknown SAM 2 weights {weights!r}: give a checkpoint file or one of "
                           f"{', '.join(_sam2_files())}.")
    state = read_state_dict(path)
    model = build_sam2(config, None, device="cpu", apply_postprocessing=False)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise WeightsError(f"{path} does not fit SAM 2 config {config}: {str(exc).splitlines()[0]}") from exc
    return Sam2Model(model.eval().to(device), f"SAM 2 ({Path(config).stem})", source)
