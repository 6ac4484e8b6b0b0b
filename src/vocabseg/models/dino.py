"""DINO and DINOv2 ViTs as second models: checkpoints in the official or timm's layout, built as timm
``VisionTransformer`` modules and served as :class:`~vocabseg.models.timm_vit.TimmViT` dense encoders.

Weights (:func:`load_dino`, model kind ``dino`` of :mod:`vocabseg.models.factory`):

* a tag, the torch hub entry name of the official repositories: ``dino_vits16``, ``dino_vits8``, ``dino_vitb16``,
  ``dino_vitb8``, ``dinov2_vit{s,b,l,g}14`` and ``dinov2_vit{s,b,l,g}14_reg``. It is read from the Hugging Face
  cache (timm's ``timm/<name>`` safetensors) or torch hub's checkpoint cache, else downloaded (Hugging Face first,
  then the official ``dl.fbaipublicfiles.com`` file) and cached (:func:`~vocabseg.models.checkpoints.fetch_hub_file`);
* a local file: a state dict in the official facebookresearch layout (``dino_vitbase8_pretrain.pth``,
  ``dinov2_vitb14_reg4_pretrain.pth``; a full DINO training checkpoint gives its ``teacher`` backbone) or in
  timm's (``model.safetensors`` of ``timm/vit_base_patch8_224.dino``), ``.pth``/``.pt``/``.bin``/``.safetensors``.

Nothing is unpickled beyond tensors. The architecture is read from the tensor shapes (:func:`infer_config`).

Position embeddings: DINO and DINOv2 without registers resize bicubically with scale factors ``(g + 0.1) / g0``
(:data:`~vocabseg.models.encoder.SCALE_PLUS_OFFSET`); DINOv2 with registers resizes to the exact size with
antialiasing (:data:`~vocabseg.models.encoder.TO_SIZE_ANTIALIASED`, ``interpolate_offset=0``,
``interpolate_antialias=True`` in its hub entries). Both skip the resize when the grid is the native one and the input
is square. timm's own ``dynamic_img_size`` resampling differs from both. Inputs are ImageNet-normalised
(torchvision's form); the features are the final norm of the tokens (:meth:`TimmViT.head`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from vocabseg.models.checkpoints import WeightsError, fetch_hub_file, missing_weights_help
from vocabseg.models.encoder import IMAGENET_TORCHVISION_NORMALIZATION, SCALE_PLUS_OFFSET, TO_SIZE_ANTIALIASED
from vocabseg.models.timm_vit import TimmViT

#: The weights of the ``dino`` model kind when none are named.
DEFAULT_TAG = "dino_vitb8"

#: Torch hub entry names of the official repositories -> timm model names (timm's pretrained configs give the
#: Hugging Face repository and the official download URL).
DINO_TAGS = {
    "dino_vits16": "vit_small_patch16_224.dino",
    "dino_vits8": "vit_small_patch8_224.dino",
    "dino_vitb16": "vit_base_patch16_224.dino",
    "dino_vitb8": "vit_base_patch8_224.dino",
    "dinov2_vits14": "vit_small_patch14_dinov2.lvd142m",
    "dinov2_vitb14": "vit_base_patch14_dinov2.lvd142m",
    "dinov2_vitl14": "vit_large_patch14_dinov2.lvd142m",
    "dinov2_vitg14": "vit_giant_patch14_dinov2.lvd142m",
    "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitl14_reg": "vit_large_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitg14_reg": "vit_giant_patch14_reg4_dinov2.lvd142m",
}


@dataclass(frozen=True)
class DinoConfig:
    """What the tensor shapes of a checkpoint say about the network."""

    patch_size: int
    embed_dim: int
    depth: int
    native_grid: int
    registers: int = 0
    layer_scale: bool = False
    mlp_hidden: int = 0
    swiglu: bool = False
    qkv_bias: bool = True

    @property
    def num_heads(self) -> int:
        return self.embed_dim // 64  # every DINO and DINOv2 model has 64-wide heads

    @property
    def version(self) -> str:
        return "dinov2" if self.layer_scale else "dino"

    def describe(self) -> str:
        size = {384: "S", 768: "B", 1024: "L", 1536: "g"}.get(self.embed_dim, f"w{self.embed_dim}-d{self.depth}")
        registers = f"+{self.registers}reg" if self.registers else ""
        return f"{'DINOv2' if self.layer_scale else 'DINO'} ViT-{size}/{self.patch_size}{registers}"


def unwrap_checkpoint(state: dict) -> dict[str, torch.Tensor]:
    """The backbone tensors of a DINO/DINOv2 checkpoint: a DINO training checkpoint's ``teacher``, without the
    ``module.``/``backbone.`` prefixes and the projection head."""
    for wrapper in ("model", "state_dict"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if isinstance(state.get("teacher"), dict):
        state = state["teacher"]
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def infer_config(state: dict[str, torch.Tensor]) -> DinoConfig:
    """The architecture of a DINO/DINOv2 state dict in the official layout or timm's (heads are 64 wide)."""
    required = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight")
    missing = [k for k in required if k not in state]
    if missing:
        raise WeightsError(f"not a DINO/DINOv2 ViT checkpoint (missing {', '.join(missing)}); expected the official "
                           "facebookresearch layout or timm's")
    official_registers = state.get("register_tokens")
    timm_registers = state.get("reg_token")
    registers = next((t.shape[1] for t in (official_registers, timm_registers) if t is not None), 0)
    # the official layout always has a class-token position; timm's has none when there are registers
    positions = state["pos_embed"].shape[1] - (0 if timm_registers is not None else 1)
    fc1 = state.get("blocks.0.mlp.fc1.weight", state.get("blocks.0.mlp.w12.weight"))
    fc2 = state.get("blocks.0.mlp.fc2.weight", state.get("blocks.0.mlp.w3.weight"))
    return DinoConfig(
        patch_size=state["patch_embed.proj.weight"].shape[-1],
        embed_dim=state["cls_token"].shape[-1],
        depth=len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
        native_grid=round(positions**0.5),
        registers=registers,
        layer_scale="blocks.0.ls1.gamma" in state,
        mlp_hidden=fc2.shape[1],
        swiglu=fc1.shape[0] == 2 * fc2.shape[1],
        qkv_bias="blocks.0.attn.qkv.bias" in state,
    )


def build_model(config: DinoConfig):
    """An empty timm ``VisionTransformer`` of ``config`` (eval mode)."""
    from functools import partial

    from timm.layers import SwiGLUPacked
    from timm.models.vision_transformer import VisionTransformer

    extra = {}
    if config.swiglu:
        extra = dict(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU)
    model = VisionTransformer(
        img_size=config.patch_size * config.native_grid, patch_size=config.patch_size, embed_dim=config.embed_dim,
        depth=config.depth, num_heads=config.num_heads,
        mlp_ratio=(2 if config.swiglu else 1) * config.mlp_hidden / config.embed_dim,
        qkv_bias=config.qkv_bias, init_values=1.0 if config.layer_scale else None, num_classes=0,
        reg_tokens=config.registers, no_embed_class=config.registers > 0,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), weight_init="skip", **extra)
    return model.eval()


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The backbone tensors of a checkpoint file, read as tensors only (nested dicts kept: a DINO training
    checkpoint holds its backbone under ``teacher``)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return unwrap_checkpoint(load_file(str(path)))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"Cannot read checkpoint {path} as plain tensors: {exc}") from exc
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds no state dict of tensors.")
    return unwrap_checkpoint(state)


def read_dino(path: str | os.PathLike, source: str = "") -> TimmViT:
    """A DINO/DINOv2 :class:`TimmViT` from a checkpoint file in the official layout or timm's (float32, CPU)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    path = Path(path)
    state = read_checkpoint(path)
    config = infer_config(state)
    model = build_model(config)
    # timm's own converter: official DINOv2 keys -> timm's (registers renamed, the class position folded into the
    # class token, mask_token dropped); DINO and timm-layout checkpoints pass through unchanged
    state = checkpoint_filter_fn({k: v.float() for k, v in state.items()}, model)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise WeightsError(f"{path} does not fit the inferred {config.describe()}: "
                           f"{str(exc).splitlines()[0]}") from exc
    resize = TO_SIZE_ANTIALIASED if config.registers else SCALE_PLUS_OFFSET
    return TimmViT(model, config.describe(), source or str(path.resolve()), IMAGENET_TORCHVISION_NORMALIZATION,
                   resize)


def _help(tag: str) -> str:
    return missing_weights_help("DINO", tag, "the checkpoint (official .pth or timm's model.safetensors)", "dino")


def fetch_dino(tag: str) -> Path:
    """Local path of a tagged checkpoint: the caches first, then a download (timm's Hugging Face repository, then
    the official file)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(DINO_TAGS[tag])
    repo = cfg.hf_hub_id.rstrip("/")
    if repo == "timm":
        repo = f"timm/{DINO_TAGS[tag]}"
    return fetch_hub_file(repo, ["model.safetensors"], _help(tag), url=cfg.url)


def load_dino(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
              arch: str | None = None) -> TimmViT:
    """The DINO/DINOv2 of ``weights`` (a tag of :data:`DINO_TAGS` or a checkpoint file) on ``device``.

    ``arch`` (a tag) names the architecture whose official weights load when ``weights`` is None (default
    :data:`DEFAULT_TAG`); a file's architecture is read from its tensor shapes. Raises :class:`WeightsError` with
    instructions when the weights are missing. :func:`vocabseg.models.factory.load_model` shares loaded models.
    """
    if weights is None:
        weights = arch or DEFAULT_TAG
    elif arch is not None:
        raise WeightsError(f"DINO weights {weights!r} name their architecture; pass weights or arch, not both")
    path = Path(os.path.expanduser(str(weights)))
    if path.is_file():
        encoder = read_dino(path)
    elif str(weights) in DINO_TAGS:
        encoder = read_dino(fetch_dino(str(weights)), source=f"{weights} ({DINO_TAGS[str(weights)]})")
    else:
        raise WeightsError(f"Unknown DINO weights {weights!r}: give a checkpoint file or one of "
                           f"{', '.join(DINO_TAGS)}.")
    encoder.model.to(device)
    return encoder
