"""open_clip models as :class:`~vocabseg.models.encoder.CLIP` pairs, and loading their weights.

* :class:`OpenCLIPViT`: the dense primitives over open_clip's own ``VisionTransformer`` (OpenAI, LAION, MetaCLIP,
  DFN ViTs of any size), written against the model's parameters.
* SigLIP / SigLIP2 image towers, which open_clip builds on timm (``TimmModel``), go through
  :class:`~vocabseg.models.timm_vit.TimmViT`.
* :class:`OpenCLIPText`: the text tower with the model's own tokenizer and pooling.
* :func:`load_clip`: a pretrained tag (``openai`` by default, any open_clip tag with ``arch``) from the Hugging Face
  cache or downloaded once, or a local file (OpenAI JIT archive, state dict, safetensors) whose architecture is
  inferred from the tensor shapes; nothing from a checkpoint is ever executed.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from vocabseg.models.checkpoints import WeightsError, fetch_hub_file, hub_cache_dir, read_state_dict, state_fingerprint
from vocabseg.models.encoder import (
    CLIP,
    CLIP_NORMALIZATION,
    DenseEncoder,
    Normalization,
    PositionResize,
    TextEncoder,
)

DEFAULT_ARCH = "ViT-B-16"
DEFAULT_WEIGHTS = "openai"


class InferenceQuickGELU(torch.nn.Module):
    """QuickGELU ``x * sigmoid(1.702 x)``; when no gradient is recorded, computed in place in its input buffer as
    ``silu(1.702 x) / 1.702`` (the same function, within 1 ulp).

    Only for the MLP's hidden activations, which nothing else reads: the input is overwritten. Allocating no
    full-size buffer per MLP (fresh memory costs page faults) makes a ViT-B/16 forward about 20% faster on a
    2-core CPU than open_clip's QuickGELU. With gradients enabled it is the plain formula (training is unaffected).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return x * torch.sigmoid(1.702 * x)
        return F.silu(x.mul_(1.702), inplace=True).div_(1.702)


def _use_inference_quickgelu(model: torch.nn.Module) -> None:
    from open_clip.transformer import QuickGELU

    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is QuickGELU:
                setattr(module, name, InferenceQuickGELU())


def _check_plain_vit(visual) -> None:
    """Refuse open_clip towers whose blocks the primitives would silently misread."""
    from open_clip.transformer import ResidualAttentionBlock

    problems = []
    if getattr(visual, "attn_pool", None) is not None:
        problems.append("an attention-pooling head")
    for block in visual.transformer.resblocks:
        if type(block) is not ResidualAttentionBlock or not isinstance(block.attn, torch.nn.MultiheadAttention):
            problems.append(f"{type(block).__name__} blocks")
            break
        if getattr(block.attn, "in_proj_weight", None) is None:
            problems.append("separate q/k/v projections")
            break
        if not isinstance(getattr(block, "ln_attn", torch.nn.Identity()), torch.nn.Identity):
            problems.append("inner attention norms (scale_attn)")
            break
    if problems:
        raise WeightsError(f"this open_clip image tower has {', '.join(problems)}, which the dense primitives do not "
                           "support; use a plain pre-norm CLIP ViT")


class OpenCLIPViT(DenseEncoder):
    """open_clip's ``VisionTransformer`` (class token first) as dense primitives. Its QuickGELU modules are replaced
    by :class:`InferenceQuickGELU` (same results, faster inference)."""

    prefix_tokens = 1

    def __init__(self, visual, name: str = "", source: str = "",
                 normalization: Normalization = CLIP_NORMALIZATION):
        _check_plain_vit(visual)
        _use_inference_quickgelu(visual)
        self.visual = visual.eval()
        self.name, self.source = name, source
        self.normalization = normalization
        self.blocks = list(visual.transformer.resblocks)
        self.patch_size = visual.conv1.kernel_size[0]
        self.num_blocks = len(self.blocks)
        self.num_heads = self.blocks[0].attn.num_heads
        self.width = visual.conv1.out_channels
        self.embed_dim = visual.proj.shape[1]
        self.native_grid = tuple(visual.grid_size)
        self._positions: dict[tuple, torch.Tensor] = {}
        self._variants: dict[tuple, OpenCLIPViT] = {}

    @property
    def device(self) -> torch.device:
        return self.visual.conv1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def state_items(self):
        return self.visual.state_dict().items()

    def variant(self, layer_norm_eps: float, exact_gelu: bool) -> OpenCLIPViT:
        """The same weights in a tower built with other numerics, e.g. MaskCLIP's mmseg ViT (every LayerNorm with
        eps 1e-6, the exact erf GELU in every MLP). Parameters are shared, not copied. Memoised per setting."""
        key = (layer_norm_eps, exact_gelu)
        if key not in self._variants:
            tensors = {id(t): t for t in (*self.visual.parameters(), *self.visual.buffers())}
            visual = copy.deepcopy(self.visual, memo=tensors)  # new modules over the same tensors
            for module in visual.modules():
                if isinstance(module, torch.nn.LayerNorm):
                    module.eps = layer_norm_eps
                if exact_gelu:
                    for name, child in module.named_children():
                        if isinstance(child, InferenceQuickGELU):
                            setattr(module, name, torch.nn.GELU())
            gelu = "GELU" if exact_gelu else "QuickGELU"
            self._variants[key] = OpenCLIPViT(visual, f"{self.name} (LayerNorm eps {layer_norm_eps:g}, {gelu})",
                                              self.source, self.normalization)
        return self._variants[key]

    def positions(self, gh: int, gw: int, resize: PositionResize) -> torch.Tensor:
        """Position embeddings ``(1 + gh*gw, D)`` for a ``gh x gw`` grid; the class-token row is kept as is.

        Memoised per grid and rule, except while the embeddings train (a cached copy would not follow the updates).
        """
        key = (gh, gw, resize)
        pos = self.visual.positional_embedding
        training = pos.requires_grad and torch.is_grad_enabled()
        if training or key not in self._positions:
            g0h, g0w = self.native_grid
            grid = pos[1:].reshape(1, g0h, g0w, -1).permute(0, 3, 1, 2)
            grid = resize(grid, (gh, gw)).permute(0, 2, 3, 1).reshape(gh * gw, -1)
            positions = torch.cat([pos[:1], grid], dim=0)
            if training:
                self._positions.clear()  # copies of the values before this update
                return positions
            self._positions[key] = positions
        return self._positions[key]

    def embed(self, images: torch.Tensor, resize: PositionResize | None = None) -> torch.Tensor:
        """Patch embedding + class token + position embedding + ``ln_pre``: ``B,3,H,W -> B,T,D``."""
        x = self.visual.conv1(images.to(self.dtype))
        b, d, gh, gw = x.shape
        x = x.reshape(b, d, gh * gw).transpose(1, 2)
        cls = self.visual.class_embedding.to(x.dtype).expand(b, 1, d)
        positions = self.positions(gh, gw, resize or self.position_resize)
        return self.visual.ln_pre(torch.cat([cls, x], dim=1) + positions.to(x.dtype))

    def block(self, index: int, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.blocks[index](x, attn_mask=attn_mask)

    def qkv(self, index: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = self.blocks[index].attn
        qkv = F.linear(self.blocks[index].ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        b, t, _ = qkv.shape
        qkv = qkv.reshape(b, t, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def attention_out(self, index: int, heads: torch.Tensor) -> torch.Tensor:
        block = self.blocks[index]
        b, _, t, _ = heads.shape
        return block.ls_1(block.attn.out_proj(heads.transpose(1, 2).reshape(b, t, -1)))

    def ffn(self, index: int, x: torch.Tensor) -> torch.Tensor:
        block = self.blocks[index]
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """``ln_post`` and ``proj`` applied to every token: ``B,T,D -> B,T,E``."""
        return self.visual.ln_post(x) @ self.visual.proj


class OpenCLIPText(TextEncoder):
    """An open_clip model's text tower with its own tokenizer (``open_clip.get_tokenizer`` of its config) and
    pooling."""

    def __init__(self, model, tokenizer=None, tokenizer_name: str = "openai"):
        if tokenizer is None:
            from open_clip.tokenizer import SimpleTokenizer

            tokenizer = SimpleTokenizer(context_length=model.context_length)
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizer_name = tokenizer_name
        self.embed_dim = _text_embed_dim(model)
        self._fingerprint: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Unnormalised text embeddings ``(len(texts), E)``.

        With the classic CLIP text tower (causal mask, end-of-text pooling) the tower runs only up to the longest
        prompt of the batch: the causal mask makes later tokens irrelevant, so the result equals the full forward.
        Other towers run the model's own ``encode_text``.
        """
        model = self.model
        tokens = self.tokenizer(texts).to(self.device)
        if getattr(model, "text_pool_type", "argmax") != "argmax" or not hasattr(model, "token_embedding"):
            return model.encode_text(tokens)
        eot = tokens.argmax(dim=-1)
        length = int(eot.max()) + 1
        x = model.token_embedding(tokens[:, :length]) + model.positional_embedding[:length]
        mask = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        x = model.ln_final(model.transformer(x, attn_mask=mask))
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        projection = model.text_projection
        return projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection

    def fingerprint(self) -> str:
        """A content hash of the text tower's weights and the tokenizer's name, to key the text cache."""
        if self._fingerprint is None:
            self._fingerprint = state_fingerprint(
                [(name, tensor) for name, tensor in self.model.state_dict().items() if not name.startswith("visual.")]
                + ([] if self.tokenizer_name == "openai" else [(f"tokenizer:{self.tokenizer_name}", torch.zeros(1))]))
        return self._fingerprint


def _text_embed_dim(model) -> int:
    projection = getattr(model, "text_projection", None)
    if isinstance(projection, torch.nn.Linear):
        return projection.out_features
    if projection is not None:
        return projection.shape[1]
    return model.text.output_dim


def from_open_clip(model, name: str = "clip", source: str = "", tokenizer=None, tokenizer_name: str = "openai",
                   normalization: Normalization | None = None) -> CLIP:
    """A built open_clip model as a :class:`CLIP`: open_clip ViTs through :class:`OpenCLIPViT`, timm towers
    (SigLIP) through :class:`~vocabseg.models.timm_vit.TimmViT`."""
    from open_clip.transformer import VisionTransformer

    model = model.eval()
    visual = model.visual
    if isinstance(visual, VisionTransformer):
        image = OpenCLIPViT(visual, name, source, normalization or _normalization_of(visual) or CLIP_NORMALIZATION)
    elif hasattr(visual, "trunk"):
        from vocabseg.models.timm_vit import TimmViT

        image = TimmViT.from_open_clip_tower(visual, name, source, normalization or _normalization_of(visual))
    else:
        raise WeightsError(f"vocabseg needs a ViT image tower (got {type(visual).__name__})")
    logit_scale = float(model.logit_scale.detach().exp()) if hasattr(model, "logit_scale") else 100.0
    return CLIP(image=image, text=OpenCLIPText(model, tokenizer, tokenizer_name), name=name, source=source,
                logit_scale=logit_scale)


def _normalization_of(visual) -> Normalization | None:
    """The statistics open_clip records on a tower (``image_mean``/``image_std``, 0..1), in torchvision's form;
    None for OpenAI's (the SCLIP lineage's 0..255 form is the library's default for them)."""
    mean, std = getattr(visual, "image_mean", None), getattr(visual, "image_std", None)
    if mean is None or std is None:
        return None
    import open_clip

    if tuple(mean) == tuple(open_clip.OPENAI_DATASET_MEAN) and tuple(std) == tuple(open_clip.OPENAI_DATASET_STD):
        return None
    return Normalization(tuple(mean), tuple(std), 255.0)


# --- weights ----------------------------------------------------------------------------------------------------

def load_clip(weights: str | os.PathLike | None = None, arch: str | None = None, device: str | torch.device = "cpu",
              cache_dir: str | None = None) -> CLIP:
    """A :class:`CLIP` from a pretrained tag or a local checkpoint file, in eval mode on ``device``.

    ``weights="openai"`` (default) builds ViT-B-16 with QuickGELU; any other open_clip tag needs the ``arch`` it
    belongs to. A file loads offline; without ``arch`` its architecture is inferred from the tensor shapes (OpenAI
    layout, QuickGELU). Raises :class:`WeightsError` with instructions when the weights are missing.
    """
    import open_clip

    weights = DEFAULT_WEIGHTS if weights is None else weights
    path = Path(os.path.expanduser(str(weights)))
    tokenizer = None
    if path.exists():
        state_dict = read_state_dict(path)
        if arch is None:
            model = build_from_state_dict(state_dict)
            name = describe_arch(model)
        else:
            model, name = _create(arch, None), arch
            tokenizer = open_clip.get_tokenizer(arch)
            try:
                model.load_state_dict(state_dict)
            except RuntimeError as exc:
                raise WeightsError(f"{path} does not fit the open_clip architecture {arch!r}: "
                                   f"{str(exc).splitlines()[0]}") from exc
        source = str(path.resolve())
    else:
        if _looks_like_path(str(weights)):
            raise WeightsError(f"Weights file not found: {weights}. Pass an existing checkpoint file (--weights PATH).")
        name = _open_clip_name(arch or DEFAULT_ARCH, str(weights))
        model = _create(name, str(weights))
        model.load_state_dict(read_state_dict(_fetch_pretrained(name, str(weights), cache_dir)))
        tokenizer = open_clip.get_tokenizer(name)
        source = f"{name}:{weights}"
    model = model.float().eval().to(device)
    tokenizer_name = "openai" if tokenizer is None or type(tokenizer).__name__ == "SimpleTokenizer" else name
    return from_open_clip(model, name, source, tokenizer, tokenizer_name)


def _create(name: str, tag: str | None):
    """open_clip model ``name`` at random init, carrying the image statistics of its pretrained weights ``tag``
    (SigLIP's 0.5 mean/std, not OpenAI's): with ``tag`` None, those every tag of ``name`` shares. A
    ``local-dir:``/``hf-hub:`` config brings its own (its ``preprocess_cfg``)."""
    import open_clip

    tags = [tag] if tag else open_clip.list_pretrained_tags_by_model(name)
    stats = {(tuple(c.get("mean") or ()), tuple(c.get("std") or ()))
             for c in (open_clip.get_pretrained_cfg(name, t) for t in tags)}
    force = {}
    if len(stats) == 1 and all(next(iter(stats))):
        mean, std = next(iter(stats))
        force = {"mean": mean, "std": std}
    return open_clip.create_model(name, pretrained=None, force_preprocess_cfg=force)


def _looks_like_path(weights: str) -> bool:
    return os.sep in weights or weights.endswith((".pt", ".pth", ".bin", ".safetensors"))


def _open_clip_name(arch: str, tag: str) -> str:
    """OpenAI weights need the QuickGELU variant; plain 'ViT-B-16' silently builds GELU."""
    if tag == "openai" and not arch.endswith("-quickgelu"):
        return f"{arch}-quickgelu"
    return arch


def _fetch_pretrained(name: str, tag: str, cache_dir: str | None) -> Path:
    """Local path of an open_clip pretrained checkpoint: the HF cache first, then a download."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        known = ", ".join(t for n, t in open_clip.list_pretrained() if n == name) or "none"
        raise WeightsError(f"Unknown pretrained weights '{tag}' for {name}. Known tags: {known}. "
                           "Or pass a local checkpoint file with --weights PATH.")
    help_text = (
        f"Could not get the weights '{tag}' for {name}.\n"
        f"  - On a machine with internet they download once to the Hugging Face cache ({hub_cache_dir()}); copy "
        f"that cache here, or\n"
        f"  - download the OpenAI ViT-B/16 archive (ViT-B-16.pt) or a state dict / safetensors file and pass "
        f"--weights PATH (Python: weights=PATH)."
    )
    hub_id = cfg.get("hf_hub", "").rstrip("/")
    if not hub_id:
        raise WeightsError(help_text)
    return fetch_hub_file(hub_id, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"), help_text,
                          cache_dir)


def infer_config(state_dict: dict[str, torch.Tensor]) -> dict:
    """open_clip ``CLIP`` keyword arguments inferred from OpenAI-layout tensor shapes (heads = width // 64)."""
    if "visual.proj" not in state_dict or "visual.conv1.weight" not in state_dict:
        raise WeightsError("The checkpoint is not a CLIP ViT in OpenAI/open_clip layout "
                           "(no 'visual.proj' / 'visual.conv1.weight'). Pass --arch for other layouts.")

    def count_blocks(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)})

    conv = state_dict["visual.conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = state_dict["ln_final.weight"].shape[0]
    return dict(
        embed_dim=state_dict["text_projection"].shape[1],
        vision_cfg=dict(layers=count_blocks("visual.transformer.resblocks."), width=width, patch_size=patch,
                        image_size=patch * grid, head_width=64),
        text_cfg=dict(context_length=state_dict["positional_embedding"].shape[0],
                      vocab_size=state_dict["token_embedding.weight"].shape[0], width=text_width,
                      heads=max(1, text_width // 64), layers=count_blocks("transformer.resblocks.")),
        quick_gelu=True,
    )


def build_from_state_dict(state_dict: dict[str, torch.Tensor]):
    """A float32 open_clip CLIP whose architecture is inferred from the tensor shapes, with the weights loaded."""
    from open_clip.model import CLIP as OpenCLIPModel

    model = OpenCLIPModel(**infer_config(state_dict))
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()})
    except RuntimeError as exc:
        raise WeightsError(f"The checkpoint does not match the inferred CLIP ViT architecture: {exc}") from exc
    return model


def describe_arch(model) -> str:
    """A readable architecture name such as 'ViT-p16-w768-l12-g14' inferred from a built model."""
    v = model.visual
    patch = v.conv1.kernel_size[0]
    return f"ViT-p{patch}-w{v.conv1.out_channels}-l{len(v.transformer.resblocks)}-g{v.grid_size[0]}"
