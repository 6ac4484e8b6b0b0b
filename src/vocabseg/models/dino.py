"""DINO and DINOv2 ViTs as helper models: timm modules, DINO's own position-embedding resize, dense primitives.

The network is timm's ``VisionTransformer`` built from the checkpoint's tensor shapes; the forward used by the
methods is written here against its parameters (as :class:`vocabseg.models.openclip.CLIPBackbone` does for CLIP),
so that the position embedding is resized exactly as the official code does and any block's q/k/v can be read.

Weights (:func:`load_dino`):

* a tag, the torch hub entry name of the official repositories: ``dino_vits16``, ``dino_vits8``, ``dino_vitb16``,
  ``dino_vitb8``, ``dinov2_vit{s,b,l,g}14`` and ``dinov2_vit{s,b,l,g}14_reg``. It is read from the Hugging Face
  cache (timm's ``timm/<name>`` safetensors) or torch hub's checkpoint cache, else downloaded (Hugging Face first,
  then the official ``dl.fbaipublicfiles.com`` file) and cached;
* a local file: a state dict in the official facebookresearch layout (``dino_vitbase8_pretrain.pth``,
  ``dinov2_vitb14_reg4_pretrain.pth``; a full DINO training checkpoint gives its ``teacher`` backbone) or in
  timm's (``model.safetensors`` of ``timm/vit_base_patch8_224.dino``), ``.pth``/``.pt``/``.bin``/``.safetensors``.

Nothing is unpickled beyond tensors (:func:`vocabseg.models.factory.read_state_dict`).

Position embeddings (``B,3,H,W`` input, ``gh x gw = H//p x W//p`` grid): DINO and DINOv2 without registers resize
bicubically with scale factors ``(g + 0.1) / g0`` (align_corners=False, no antialiasing); DINOv2 with registers
resizes to the exact size with antialiasing (``interpolate_offset=0``, ``interpolate_antialias=True`` in its hub
entries). Both skip the resize when the grid is the native one and the input is square. timm's own
``dynamic_img_size`` resampling differs from both.

Layouts: images ``B,3,H,W`` (ImageNet-normalised); tokens ``B,T,D`` with the class token first, then the register
tokens, then the ``gh*gw`` patch tokens in row-major order; per-head tensors ``B,heads,T,head_dim``.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

#: ImageNet statistics (0..1 units), the input normalisation of DINO and DINOv2.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: OpenAI CLIP statistics (0..1 units).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

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


def renormalise(images: torch.Tensor, mean_from, std_from, mean_to=IMAGENET_MEAN, std_to=IMAGENET_STD
                ) -> torch.Tensor:
    """``B,3,H,W`` images normalised with one mean/std -> normalised with another, in two steps as the official
    code does (``x * std_from + mean_from``, then ``(x - mean_to) / std_to``, float32 constants)."""

    def column(values):
        return torch.tensor(values, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)

    pixels = images * column(std_from) + column(mean_from)
    return (pixels - column(mean_to)) / column(std_to)


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
        from vocabseg.models.factory import WeightsError

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


class DinoEncoder:
    """A DINO/DINOv2 ViT and the dense primitives helper-model methods use: embed, run blocks, q/k/v, final norm.

    ``name`` describes the architecture (``"DINO ViT-B/8"``), ``source`` where the weights came from.
    """

    def __init__(self, model, config: DinoConfig, name: str = "", source: str = ""):
        self.model = model.eval()
        self.config = config
        self.name = name or config.describe()
        self.source = source
        self.blocks = list(model.blocks)
        self.patch_size = config.patch_size
        self.num_heads = config.num_heads
        self.width = config.embed_dim
        self.num_prefix_tokens = 1 + config.registers
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.model.cls_token.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.cls_token.dtype

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid of an input: the strided patch convolution floors."""
        return height // self.patch_size, width // self.patch_size

    def patch_positions(self, gh: int, gw: int, square: bool) -> torch.Tensor:
        """Position embeddings of the patch tokens ``(gh*gw, D)`` for a ``gh x gw`` grid, resized as the official
        ``interpolate_pos_encoding`` does (see the module docstring); ``square``: the input is square."""
        key = (gh, gw, square)
        if key not in self._pos_cache:
            pos = self.model.pos_embed[0] if self.model.no_embed_class else self.model.pos_embed[0, 1:]
            g0 = self.config.native_grid
            if (gh, gw) == (g0, g0) and square:
                self._pos_cache[key] = pos
            else:
                grid = pos.float().reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
                if self.config.registers:
                    grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", antialias=True)
                else:
                    grid = F.interpolate(grid, scale_factor=((gh + 0.1) / g0, (gw + 0.1) / g0), mode="bicubic",
                                         align_corners=False)
                if grid.shape[-2:] != (gh, gw):
                    raise RuntimeError(f"position embedding resized to {tuple(grid.shape[-2:])}, wanted {(gh, gw)}")
                self._pos_cache[key] = grid.permute(0, 2, 3, 1).reshape(gh * gw, -1).to(pos.dtype)
        return self._pos_cache[key]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding, class token (with its position), register tokens, patch positions: ``B,3,H,W -> B,T,D``."""
        model = self.model
        height, width = images.shape[-2:]
        x = model.patch_embed.proj(images.to(self.dtype))
        b, _, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2) + self.patch_positions(gh, gw, height == width).to(x.dtype)
        cls = model.cls_token
        if not model.no_embed_class:
            cls = cls + model.pos_embed[:, :1]
        prefix = [cls.expand(b, -1, -1)]
        if self.config.registers:
            prefix.append(model.reg_token.expand(b, -1, -1))
        return torch.cat([*prefix, x], dim=1)

    def run_blocks(self, x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Run blocks ``start .. end-1`` unchanged."""
        for block in self.blocks[start:end]:
            x = block(x)
        return x

    def qkv(self, index: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of block ``index`` computed from ``norm1(x)``, each ``B,heads,T,head_dim``."""
        block = self.blocks[index]
        qkv = block.attn.qkv(block.norm1(x))
        b, t, _ = qkv.shape
        qkv = qkv.reshape(b, t, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """The final LayerNorm."""
        return self.model.norm(x)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised output of the last block, all tokens ``B,T,D`` (``get_intermediate_layers(x, n=1)[0]``)."""
        return self.norm(self.run_blocks(self.embed(images)))

    def patch_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Normalised last-block patch tokens ``B,N,D`` (class and register tokens dropped) and their grid."""
        return self.tokens(images)[:, self.num_prefix_tokens:], self.grid(*images.shape[-2:])


# --- weights ----------------------------------------------------------------------------------------------------

def _help(tag: str) -> str:
    return (f"Could not get the DINO weights '{tag}'.\n"
            f"  - On a machine with internet they download once to the Hugging Face cache "
            f"({os.environ.get('HF_HUB_CACHE') or '~/.cache/huggingface/hub'}) or torch hub's checkpoint folder "
            f"({Path(torch.hub.get_dir()) / 'checkpoints'}); copy that cache here, or\n"
            f"  - download the checkpoint (official .pth or timm's model.safetensors) and pass its path "
            f"(--option dino=PATH; Python: dino=PATH).")


def _fetch(tag: str) -> Path:
    """Local path of a tagged checkpoint: the Hugging Face and torch hub caches first, then a download."""
    from timm.models import get_pretrained_cfg

    from vocabseg.models.factory import WeightsError, _hub_unreachable

    cfg = get_pretrained_cfg(DINO_TAGS[tag])
    hub_id, url = cfg.hf_hub_id.rstrip("/"), cfg.url
    if hub_id == "timm":
        hub_id = f"timm/{DINO_TAGS[tag]}"
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(hub_id, "model.safetensors")
    if isinstance(cached, str):
        return Path(cached)
    official = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if official.is_file():
        return official
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise WeightsError(_help(tag) + "\n  (HF_HUB_OFFLINE is set, so nothing was downloaded.)")
    unreachable = _hub_unreachable()
    if unreachable:
        raise WeightsError(_help(tag) + f"\n  (No connection: {unreachable}.)")
    errors = []
    try:
        log.info("downloading %s/model.safetensors", hub_id)
        return Path(hf_hub_download(hub_id, "model.safetensors", etag_timeout=10))
    except Exception as exc:  # network errors come in many types; fall back to the official file
        errors.append(f"{hub_id}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    try:
        log.info("downloading %s", url)
        official.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(official), progress=False)
        return official
    except Exception as exc:
        errors.append(f"{url}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    raise WeightsError(_help(tag) + "\n  Download errors: " + "; ".join(errors))


def read_dino(path: str | os.PathLike, source: str = "") -> DinoEncoder:
    """A :class:`DinoEncoder` from a checkpoint file in the official layout or timm's (float32, CPU)."""
    from vocabseg.models.factory import WeightsError, read_state_dict

    path = Path(path)
    if path.suffix == ".safetensors":
        state = read_state_dict(path)
    else:  # keep nested dicts: a DINO training checkpoint holds its backbone under 'teacher'
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise WeightsError(f"Cannot read checkpoint {path} as plain tensors: {exc}") from exc
        for wrapper in ("model", "state_dict"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
        if not isinstance(state, dict):
            raise WeightsError(f"{path} holds no state dict of tensors.")
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = unwrap_checkpoint(state)
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
    return DinoEncoder(model, config, source=source or str(path.resolve()))


@functools.lru_cache(maxsize=4)
def load_dino(weights: str = "dino_vitb8", device: str = "cpu") -> DinoEncoder:
    """The DINO/DINOv2 of ``weights`` (a tag of :data:`DINO_TAGS` or a checkpoint file) on ``device``.

    Loaded once per process and shared: methods asking for the same weights on the same device get the same
    encoder. Raises :class:`vocabseg.models.factory.WeightsError` with instructions when the weights are missing.
    """
    from vocabseg.models.factory import WeightsError

    path = Path(os.path.expanduser(str(weights)))
    if path.is_file():
        encoder = read_dino(path)
    elif str(weights) in DINO_TAGS:
        encoder = read_dino(_fetch(str(weights)), source=f"{weights} ({DINO_TAGS[str(weights)]})")
    else:
        raise WeightsError(f"Unknown DINO weights {weights!r}: give a checkpoint file or one of "
                           f"{', '.join(DINO_TAGS)}.")
    encoder.model.to(device)
    return encoder
