"""OFA's unified encoder and IFSeg's segmentation ("surrogate") decoder in plain PyTorch, with fairseq parameter names.

Encoder (OFA): the sequence is ``[image tokens (h*w) ; text tokens (L)]``. Image tokens are
``patch_layernorm_embedding(image_proj(ResNet(x)) + type[1])`` (or any ``B,h*w,D`` embeddings put in their place, as
IFSeg's artificial maps), text tokens ``layernorm_embedding(E[tokens] + type[0])``. Every layer gets the absolute
position bias (image positions through ``image_pos_ln``, text positions through ``pos_ln``, shared
``pos_{q,k}_linear``) plus its relative bias: log buckets on the text block, 2-D buckets on the image block.

IFSeg's changes (``models/segofa``, README section 9 of the oracle): the image relative bias is built on the
``seg_grid`` x ``seg_grid`` (32x32) training grid and bilinearly resized to the actual grid (keys, then queries); the
absolute image positions are a direct lookup ``col + row*42 + 1`` when ``h*w <= 32*32`` (the top-left corner of the
42-wide table; columns past 42 alias into the next row) and a bilinear resize of the 32x32 block otherwise.

Decoder (IFSeg, ``decoder_input_type=encoder_output``): one parallel pass over ``[E[bos]; enc_out[:h*w]]`` (position
``p`` carries the encoder output of cell ``p-1``), causal self-attention, cross-attention to the whole encoder output.
Positions: ``embed_seg_positions`` (row 0 = BOS, rows 1.. the 32x32 grid, resized to the actual grid) through
``seg_pos_ln`` and ``self_pos_*`` / ``cross_pos_*`` (against the encoder's normalised positions), plus per-layer seg
relative biases resized from 32x32 with the BOS row and column kept (queries, then keys). Output ``p < h*w`` is the
feature of grid cell ``p``; the last one is unused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vocabseg.models.ofa.config import OFAConfig
from vocabseg.models.ofa.layers import DecoderLayer, EncoderLayer
from vocabseg.models.ofa.positions import (
    image_buckets,
    image_position_ids,
    resize_grid_rows,
    resize_pair_bias,
    token_buckets,
)
from vocabseg.models.ofa.resnet import ResNet, linear_rates

#: Keys of fairseq checkpoints that are not parameters of :class:`OFA` (version counters, IFSeg's tied copies of
#: the token embedding and of the category embeddings, OFA's output projection tied to the token embedding).
#: Their index buffers are rebuilt here from the config.
IGNORED_KEYS = (
    "encoder.version", "decoder.version", "encoder.embed_tokens_bag.weight", "encoder.seg_embed_tokens.weight",
    "decoder.seg_embed_tokens.weight", "decoder.seg_projection.weight", "decoder.output_projection.weight",
    "encoder.token_rp_bucket", "encoder.image_rp_bucket", "decoder.seg_rp_bucket", "decoder.token_rp_bucket",
    "decoder.image_rp_bucket", "decoder.image_position_idx", "decoder.bin_id_offset", "decoder.seg_id_offset",
    "decoder.region_prefix",
)
#: Parameters IFSeg adds to OFA (initialised N(0, 0.02) when an OFA checkpoint is loaded, as the official
#: ``init_bert_params`` does).
IFSEG_KEYS = ("decoder.embed_seg_positions.weight", "decoder.seg_pos_ln.weight", "decoder.seg_pos_ln.bias",
              "decoder.seg_rel_pos_table_list.")


def position_bias(q_pos: torch.Tensor, k_pos: torch.Tensor, q_linear: nn.Linear, k_linear: nn.Linear, heads: int,
                  scaling: float) -> torch.Tensor:
    """Absolute position bias ``H,Sq,Sk`` of normalised positions ``Sq,D`` and ``Sk,D``."""
    q = q_linear(q_pos).unflatten(-1, (heads, -1)).transpose(0, 1) * scaling
    k = k_linear(k_pos).unflatten(-1, (heads, -1)).transpose(0, 1)
    return q @ k.transpose(-1, -2)


def _table_bias(table: nn.Embedding, buckets: torch.Tensor) -> torch.Tensor:
    """Relative bias ``H,S,S`` looked up from a table ``(buckets, H)``."""
    return F.embedding(buckets, table.weight).permute(2, 0, 1)


def _tables(rows: int, heads: int, count: int) -> nn.ModuleList:
    return nn.ModuleList(nn.Embedding(rows, heads) for _ in range(count))


@dataclass
class EncoderOutput:
    """``hidden`` ``B,T,D`` (after the final LayerNorm), ``positions`` ``T,D`` (normalised, for the decoder's
    cross bias), ``key_mask`` ``B,1,1,T`` (0 or -inf at padding), ``grid`` of the ``h*w`` image tokens first."""

    hidden: torch.Tensor
    positions: torch.Tensor
    key_mask: torch.Tensor
    grid: tuple[int, int]


class Encoder(nn.Module):
    def __init__(self, config: OFAConfig, embed_tokens: nn.Embedding):
        super().__init__()
        dim, heads = config.embed_dim, config.heads
        self.config = config
        self.embed_tokens = embed_tokens
        self.layernorm_embedding = nn.LayerNorm(dim)
        self.type_embedding = nn.Embedding(2, dim)
        self.embed_images = ResNet(config.resnet_layers, config.resnet_drop_path)
        self.image_proj = nn.Linear(1024, dim)
        self.patch_layernorm_embedding = nn.LayerNorm(dim)
        self.embed_positions = nn.Embedding(config.max_positions + 2, dim)
        self.embed_image_positions = nn.Embedding(config.image_bucket_size ** 2 + 1, dim)
        self.pos_ln = nn.LayerNorm(dim)
        self.image_pos_ln = nn.LayerNorm(dim)
        self.pos_q_linear = nn.Linear(dim, dim)
        self.pos_k_linear = nn.Linear(dim, dim)
        rates = linear_rates(config.encoder_drop_path, config.encoder_layers)
        self.layers = nn.ModuleList(EncoderLayer(config, rate) for rate in rates)
        self.layer_norm = nn.LayerNorm(dim)
        self.token_rel_pos_table_list = _tables(2 * config.token_bucket_size - 1, heads, config.encoder_layers)
        self.image_rel_pos_table_list = _tables((2 * config.image_bucket_size - 1) ** 2 + 3, heads,
                                                config.encoder_layers)
        self.register_buffer("token_rp_bucket", token_buckets(config.token_bucket_size, config.max_positions),
                             persistent=False)
        base = (config.seg_grid, config.seg_grid)
        ids = image_position_ids(base, config.image_bucket_size)
        self.register_buffer("base_image_ids", ids, persistent=False)
        self.register_buffer("base_image_buckets", image_buckets(config.image_bucket_size)[ids][:, ids],
                             persistent=False)

    @property
    def base_grid(self) -> tuple[int, int]:
        return self.config.seg_grid, self.config.seg_grid

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images ``B,3,H,W`` -> ResNet layer3 features ``B,1024,h,w``."""
        return self.embed_images(images)

    def project_features(self, features: torch.Tensor) -> torch.Tensor:
        """ResNet features ``B,1024,h,w`` -> image token embeddings ``B,h*w,D`` (``image_proj``)."""
        return self.image_proj(features.flatten(2).transpose(1, 2))

    def image_positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """Absolute image position embeddings ``h*w,D`` (before ``image_pos_ln``)."""
        if grid[0] * grid[1] > self.base_grid[0] * self.base_grid[1]:
            return resize_grid_rows(self.embed_image_positions(self.base_image_ids), self.base_grid, grid)
        ids = image_position_ids(grid, self.config.image_bucket_size).to(self.base_image_ids.device)
        return self.embed_image_positions(ids)

    def image_rel_bias(self, layer: int, grid: tuple[int, int]) -> torch.Tensor:
        """Relative bias ``H,h*w,h*w`` of the image block: built on the base grid, resized keys first."""
        bias = _table_bias(self.image_rel_pos_table_list[layer], self.base_image_buckets)
        return resize_pair_bias(bias, self.base_grid, grid, keys_first=True)

    def forward(self, tokens: torch.Tensor, image_embeds: torch.Tensor, grid: tuple[int, int]) -> EncoderOutput:
        """Text ``tokens`` ``B,L`` and image token embeddings ``B,h*w,D`` on ``grid`` -> :class:`EncoderOutput`."""
        batch, length = tokens.shape
        cells = grid[0] * grid[1]
        types = self.type_embedding.weight
        text = self.layernorm_embedding(self.embed_tokens(tokens) + types[0])
        image = self.patch_layernorm_embedding(image_embeds + types[1])
        x = F.dropout(torch.cat([image, text], dim=1), self.config.dropout, self.training)
        padding = torch.cat([tokens.new_zeros(batch, cells, dtype=torch.bool), tokens.eq(self.config.pad)], dim=1)
        if padding.any():
            x = x * (~padding)[..., None].to(x.dtype)
        key_mask = torch.zeros(padding.shape, dtype=x.dtype, device=x.device).masked_fill(padding, float("-inf"))
        key_mask = key_mask[:, None, None, :]
        positions = torch.cat([self.image_pos_ln(self.image_positions(grid)),
                               self.pos_ln(self.embed_positions.weight[:length])])
        absolute = position_bias(positions, positions, self.pos_q_linear, self.pos_k_linear, self.config.heads,
                                 self.layers[0].self_attn.scaling)
        text_buckets = self.token_rp_bucket[:length, :length]
        for index, layer in enumerate(self.layers):
            bias = absolute.clone()
            bias[:, -length:, -length:] += _table_bias(self.token_rel_pos_table_list[index], text_buckets)
            bias[:, :cells, :cells] += self.image_rel_bias(index, grid)
            x = layer(x, bias[None] + key_mask)
        return EncoderOutput(self.layer_norm(x), positions, key_mask, tuple(grid))


class SegDecoder(nn.Module):
    """IFSeg's surrogate decoder (with OFA's text-decoder tables kept so that checkpoints load and save whole)."""

    def __init__(self, config: OFAConfig, embed_tokens: nn.Embedding):
        super().__init__()
        dim, heads, layers = config.embed_dim, config.heads, config.decoder_layers
        self.config = config
        self.embed_tokens = embed_tokens
        self.layernorm_embedding = nn.LayerNorm(dim)
        self.embed_positions = nn.Embedding(config.max_positions + 2, dim)
        self.embed_image_positions = nn.Embedding(config.image_bucket_size ** 2 + 1, dim)
        self.embed_seg_positions = nn.Embedding(config.seg_grid ** 2 + 1, dim)
        self.pos_ln = nn.LayerNorm(dim)
        self.image_pos_ln = nn.LayerNorm(dim)
        self.seg_pos_ln = nn.LayerNorm(dim)
        self.self_pos_q_linear = nn.Linear(dim, dim)
        self.self_pos_k_linear = nn.Linear(dim, dim)
        self.cross_pos_q_linear = nn.Linear(dim, dim)
        self.cross_pos_k_linear = nn.Linear(dim, dim)
        self.code_layernorm_embedding = nn.LayerNorm(dim)
        rates = linear_rates(config.decoder_drop_path, layers)
        self.layers = nn.ModuleList(DecoderLayer(config, rate) for rate in rates)
        self.layer_norm = nn.LayerNorm(dim)
        self.token_rel_pos_table_list = _tables(2 * config.token_bucket_size - 1, heads, layers)
        self.image_rel_pos_table_list = _tables((2 * config.image_bucket_size - 1) ** 2 + 3, heads, layers)
        self.seg_rel_pos_table_list = _tables((2 * config.seg_grid - 1) ** 2 + 3, heads, layers)
        self.register_buffer("seg_rp_bucket", image_buckets(config.seg_grid), persistent=False)

    @property
    def base_grid(self) -> tuple[int, int]:
        return self.config.seg_grid, self.config.seg_grid

    def seg_positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """Seg position embeddings ``1+h*w,D`` (BOS first), before ``seg_pos_ln``."""
        table = self.embed_seg_positions.weight
        return torch.cat([table[:1], resize_grid_rows(table[1:], self.base_grid, grid)])

    def seg_rel_bias(self, layer: int, grid: tuple[int, int]) -> torch.Tensor:
        """Relative bias ``H,1+h*w,1+h*w``: the base-grid block resized (queries, then keys), BOS row/column kept."""
        bias = _table_bias(self.seg_rel_pos_table_list[layer], self.seg_rp_bucket)
        if grid == self.base_grid:
            return bias
        base = self.base_grid
        cells = resize_pair_bias(bias[:, 1:, 1:], base, grid, keys_first=False)
        row = resize_grid_rows(bias[:, :1, 1:].unsqueeze(-1), base, grid).squeeze(-1)
        column = resize_grid_rows(bias[:, 1:, :1], base, grid)
        return torch.cat([torch.cat([bias[:, :1, :1], row], dim=2), torch.cat([column, cells], dim=2)], dim=1)

    def forward(self, encoder: EncoderOutput) -> torch.Tensor:
        """Decoder features ``B,1+h*w,D`` (after the final LayerNorm) from an :class:`EncoderOutput`."""
        hidden, grid = encoder.hidden, encoder.grid
        batch, cells = hidden.shape[0], grid[0] * grid[1]
        bos = self.embed_tokens.weight[self.config.bos].expand(batch, 1, -1)
        x = self.layernorm_embedding(torch.cat([bos.to(hidden.dtype), hidden[:, :cells]], dim=1))
        x = F.dropout(x, self.config.dropout, self.training)
        positions = self.seg_pos_ln(self.seg_positions(grid))
        scaling = self.layers[0].self_attn.scaling
        heads = self.config.heads
        self_abs = position_bias(positions, positions, self.self_pos_q_linear, self.self_pos_k_linear, heads, scaling)
        cross = position_bias(positions, encoder.positions, self.cross_pos_q_linear, self.cross_pos_k_linear, heads,
                              scaling)[None] + encoder.key_mask
        length = cells + 1
        causal = torch.full((length, length), float("-inf"), dtype=x.dtype, device=x.device).triu(1)
        for index, layer in enumerate(self.layers):
            self_bias = self_abs + self.seg_rel_bias(index, grid) + causal
            x = layer(x, hidden, self_bias[None], cross)
        return self.layer_norm(x)


class OFA(nn.Module):
    """OFA encoder + IFSeg decoder sharing one token embedding; parameter names are fairseq's."""

    def __init__(self, config: OFAConfig):
        super().__init__()
        self.config = config
        embed_tokens = nn.Embedding(config.vocab_rows, config.embed_dim, padding_idx=config.pad)
        self.encoder = Encoder(config, embed_tokens)
        self.decoder = SegDecoder(config, embed_tokens)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.encoder.embed_tokens

    def embed_words(self, words: list[torch.Tensor]) -> torch.Tensor:
        """Mean token embedding ``N,D`` of each of ``N`` token-id sequences (an ``EmbeddingBag`` in mean mode)."""
        weight = self.embed_tokens.weight
        ids = torch.cat(words).to(weight.device)
        lengths = torch.tensor([len(w) for w in words], device=weight.device)
        offsets = torch.cumsum(lengths, 0) - lengths
        return F.embedding_bag(ids, weight, offsets, mode="mean")

    def forward(self, tokens: torch.Tensor, image_embeds: torch.Tensor, grid: tuple[int, int]
                ) -> tuple[torch.Tensor, EncoderOutput]:
        """Decoder features ``B,1+h*w,D`` and the encoder output, from text ``tokens`` ``B,L`` and image token
        embeddings ``B,h*w,D`` (``encoder.project_features`` of ResNet features, or artificial ones)."""
        encoder = self.encoder(tokens, image_embeds, grid)
        return self.decoder(encoder), encoder

    def init_weights(self, generator: torch.Generator | None = None, only: tuple[str, ...] | None = None) -> None:
        """BERT initialisation (fairseq ``init_bert_params``): Linear and Embedding weights N(0, 0.02), biases 0,
        the padding row 0, LayerNorm (1, 0), ResNet convolutions Kaiming-normal. ``only``: names (prefixes) to
        initialise; the rest is left as it is."""
        for name, module in self.named_modules():
            if only is not None and not any(f"{name}.weight".startswith(p) for p in only):
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.data.normal_(0.0, 0.02, generator=generator)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    module.bias.data.zero_()
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    module.weight.data[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.data.fill_(1.0)
                module.bias.data.zero_()
            elif isinstance(module, nn.Conv2d):
                fan_out = module.out_channels * module.kernel_size[0] * module.kernel_size[1]
                module.weight.data.normal_(0.0, (2.0 / fan_out) ** 0.5, generator=generator)
