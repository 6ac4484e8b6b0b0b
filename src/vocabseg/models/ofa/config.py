"""Sizes and options of an OFA encoder-decoder (Wang et al. 2022) with IFSeg's segmentation decoder (Yun et al. 2023).

Field values default to ``ofa_base`` with the flags of IFSeg's run scripts (pre-LN, NormFormer ``--scale-attn
--scale-fc --scale-heads``, ``attn_scale_factor`` 2, buckets 256/42, ``--patch-image-size 512``); :data:`OFA_SIZES`
holds the released sizes. :func:`config_from_state_dict` reads the sizes off a checkpoint's tensors, so any of
them (and the tiny test models) builds from data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

#: Bottleneck blocks of ResNet layers 1-3 (OFA keeps the stem up to layer3: stride 16, 1024 channels).
RESNET_LAYERS: dict[str, tuple[int, int, int]] = {
    "resnet50": (3, 4, 6),
    "resnet101": (3, 4, 23),
    "resnet152": (3, 8, 36),
}

#: Rows of the released English token embedding: GPT-2 BPE dictionary (50264) + ``<mask>`` + 8192 codes + 1000 bins.
OFA_VOCAB_ROWS = 59457


@dataclass(frozen=True)
class OFAConfig:
    """Everything that shapes the network; dropout rates only act in training."""

    embed_dim: int = 768
    ffn_dim: int = 3072
    heads: int = 12
    encoder_layers: int = 6
    decoder_layers: int = 6
    resnet_layers: tuple[int, int, int] = RESNET_LAYERS["resnet101"]
    vocab_rows: int = OFA_VOCAB_ROWS
    max_positions: int = 1024
    token_bucket_size: int = 256
    image_bucket_size: int = 42
    attn_scale_factor: float = 2.0
    normformer: bool = True  # c_attn per head, LayerNorm after attention and inside the FFN
    patch_image_size: int = 512  # IFSeg's --orig-patch-image-size: the 32x32 grid its tables are defined on
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    encoder_drop_path: float = 0.1
    decoder_drop_path: float = 0.1
    resnet_drop_path: float = 0.0
    pad: int = 1
    bos: int = 0
    eos: int = 2

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.heads

    @property
    def seg_grid(self) -> int:
        """Side of the token grid of IFSeg's seg position tables (``patch_image_size // 16``)."""
        return self.patch_image_size // 16

    def replace(self, **changes) -> OFAConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> OFAConfig:
        return cls(**{**data, "resnet_layers": tuple(data["resnet_layers"])})


def _size(dim: int, layers: int, decoder_layers: int, heads: int, resnet: str) -> OFAConfig:
    return OFAConfig(embed_dim=dim, ffn_dim=4 * dim, heads=heads, encoder_layers=layers, decoder_layers=decoder_layers,
                     resnet_layers=RESNET_LAYERS[resnet])


#: The released OFA sizes (OFA's ``ofa_{tiny,medium,base,large,huge}`` architectures).
OFA_SIZES: dict[str, OFAConfig] = {
    "tiny": _size(256, 4, 4, 4, "resnet50"),
    "medium": _size(512, 4, 4, 8, "resnet101"),
    "base": _size(768, 6, 6, 12, "resnet101"),
    "large": _size(1024, 12, 12, 16, "resnet152"),
    "huge": _size(1280, 24, 12, 16, "resnet152"),
}


#: Config fields that tensor shapes do not determine (stored with trained checkpoints).
UNSHAPED_FIELDS = ("attn_scale_factor", "dropout", "attention_dropout", "activation_dropout", "encoder_drop_path",
                   "decoder_drop_path", "resnet_drop_path", "pad", "bos", "eos")


def _count(state_dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".", 1)[0] for k in state_dict if k.startswith(prefix)})


def config_from_state_dict(state_dict: dict, **options) -> OFAConfig:
    """The :class:`OFAConfig` whose shapes fit a fairseq-named state dict; ``options`` set the rest (dropout...)."""
    embed = state_dict["encoder.embed_tokens.weight"]
    heads = state_dict["encoder.token_rel_pos_table_list.0.weight"].shape[1]
    image_rows = state_dict["encoder.embed_image_positions.weight"].shape[0]
    seg = state_dict.get("decoder.embed_seg_positions.weight")
    found = dict(
        embed_dim=embed.shape[1],
        ffn_dim=state_dict["encoder.layers.0.fc1.weight"].shape[0],
        heads=heads,
        encoder_layers=_count(state_dict, "encoder.layers."),
        decoder_layers=_count(state_dict, "decoder.layers."),
        resnet_layers=tuple(_count(state_dict, f"encoder.embed_images.layer{i}.") for i in (1, 2, 3)),
        vocab_rows=embed.shape[0],
        max_positions=state_dict["encoder.embed_positions.weight"].shape[0] - 2,
        token_bucket_size=(state_dict["encoder.token_rel_pos_table_list.0.weight"].shape[0] + 1) // 2,
        image_bucket_size=round((image_rows - 1) ** 0.5),
        normformer="encoder.layers.0.self_attn.c_attn" in state_dict,
    )
    if seg is not None:
        found["patch_image_size"] = 16 * round((seg.shape[0] - 1) ** 0.5)
    return OFAConfig(**{**found, **options})
