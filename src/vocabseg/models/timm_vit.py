"""timm ``VisionTransformer`` models as :class:`~vocabseg.models.encoder.DenseEncoder`: DINO and DINOv2 (helper
models), and the SigLIP / SigLIP2 image towers that open_clip builds on timm.

The primitives are written against the model's own parameters (``patch_embed``, ``cls_token``/``reg_token``,
``pos_embed``, blocks with ``norm1``/``attn.qkv``/``attn.q_norm``/``attn.k_norm``/``attn.proj``/``ls1``/``norm2``/
``mlp``/``ls2``, final ``norm``), so a recipe can rebuild any block.

Per-token readout (:meth:`TimmViT.head`): the final norm, then what the model puts on top of it applied to each token
on its own. For DINO that is nothing (the features are the normalised tokens). For SigLIP, whose image embedding is
an attention-pooling head (a learned query attending to all tokens, then an MLP) and open_clip's projection, each
token is pooled alone: with a single key the attention weight is 1, so a token's readout is the head's value
projection and MLP of that token, the dense analogue of a class-token projection.
"""

from __future__ import annotations

import torch

from vocabseg.models.encoder import SCALE_PLUS_OFFSET, DenseEncoder, Normalization, PositionResize


class TimmViT(DenseEncoder):
    """A timm ``VisionTransformer`` as dense primitives.

    ``position_resize`` resizes the patch position grid (DINO: scale factors ``(g + 0.1) / g0``; DINOv2 with
    registers: exact size with antialiasing). As the official DINO code, the table is used as is only when the grid
    is the native one *and* the input is square. ``readout`` (``B,T,D -> B,T,E``) follows the final norm in
    :meth:`head` (None: the normalised tokens are the features).
    """

    def __init__(self, model, name: str = "", source: str = "", normalization: Normalization | None = None,
                 position_resize: PositionResize = SCALE_PLUS_OFFSET, readout=None, embed_dim: int | None = None):
        from vocabseg.models.encoder import IMAGENET_TORCHVISION_NORMALIZATION

        self.model = model.eval()
        self.name, self.source = name, source
        self.normalization = normalization or IMAGENET_TORCHVISION_NORMALIZATION
        self.position_resize = position_resize
        self.readout = readout
        self.blocks = list(model.blocks)
        self.num_blocks = len(self.blocks)
        self.patch_size = model.patch_embed.proj.kernel_size[0]
        self.num_heads = self.blocks[0].attn.num_heads
        self.width = model.embed_dim
        self.embed_dim = embed_dim or self.width
        self.prefix_tokens = model.num_prefix_tokens
        grid = model.patch_embed.grid_size
        self.native_grid = (int(grid[0]), int(grid[1]))
        self._positions: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_open_clip_tower(cls, visual, name: str, source: str, normalization: Normalization | None):
        """An open_clip ``TimmModel`` tower (SigLIP): the trunk with its attention-pooling head and open_clip's
        projection as the per-token readout."""
        from vocabseg.models.encoder import SIGLIP_NORMALIZATION, TO_SIZE

        trunk = visual.trunk
        if getattr(trunk, "attn_pool", None) is None:
            raise ValueError(f"{name}: a timm tower without an attention-pooling head is not supported")

        def readout(x: torch.Tensor) -> torch.Tensor:
            b, t, d = x.shape
            pooled = trunk.attn_pool(x.reshape(b * t, 1, d))  # each token pooled alone
            return visual.head(trunk.fc_norm(pooled)).reshape(b, t, -1)

        embed_dim = readout(torch.zeros(1, 1, trunk.embed_dim, device=next(trunk.parameters()).device)).shape[-1]
        return cls(trunk, name, source, normalization or SIGLIP_NORMALIZATION, TO_SIZE, readout, embed_dim)

    @property
    def device(self) -> torch.device:
        return self.model.patch_embed.proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.patch_embed.proj.weight.dtype

    def state_items(self):
        return self.model.state_dict().items()

    def patch_positions(self, gh: int, gw: int, square: bool, resize: PositionResize) -> torch.Tensor:
        """Position embeddings of the patch tokens ``(gh*gw, D)``."""
        key = (gh, gw, square, resize)
        if key not in self._positions:
            model = self.model
            pos = model.pos_embed[0] if model.no_embed_class else model.pos_embed[0, model.num_prefix_tokens:]
            g0h, g0w = self.native_grid
            if (gh, gw) == (g0h, g0w) and square:
                self._positions[key] = pos
            else:
                grid = pos.float().reshape(1, g0h, g0w, -1).permute(0, 3, 1, 2)
                grid = resize(grid, (gh, gw))
                self._positions[key] = grid.permute(0, 2, 3, 1).reshape(gh * gw, -1).to(pos.dtype)
        return self._positions[key]

    def embed(self, images: torch.Tensor, resize: PositionResize | None = None) -> torch.Tensor:
        """Patch embedding, prefix tokens (class token with its position, registers), patch positions, the
        pre-norm: ``B,3,H,W -> B,T,D``."""
        model = self.model
        height, width = images.shape[-2:]
        x = model.patch_embed.proj(images.to(self.dtype))
        b, _, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = x + self.patch_positions(gh, gw, height == width, resize or self.position_resize).to(x.dtype)
        prefix = []
        if model.cls_token is not None:
            cls = model.cls_token if model.no_embed_class else model.cls_token + model.pos_embed[:, :1]
            prefix.append(cls.expand(b, -1, -1))
        if model.reg_token is not None:
            prefix.append(model.reg_token.expand(b, -1, -1))
        return model.norm_pre(torch.cat([*prefix, x], dim=1))

    def block(self, index: int, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attn_mask is None:
            return self.blocks[index](x)
        q, k, v = self.qkv(index, x)
        heads = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype))
        return self.ffn(index, x + self.attention_out(index, heads))

    def qkv(self, index: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        block = self.blocks[index]
        qkv = block.attn.qkv(block.norm1(x))
        b, t, _ = qkv.shape
        q, k, v = qkv.reshape(b, t, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return block.attn.q_norm(q), block.attn.k_norm(k), v

    def attention_out(self, index: int, heads: torch.Tensor) -> torch.Tensor:
        block = self.blocks[index]
        b, _, t, _ = heads.shape
        merged = heads.transpose(1, 2).reshape(b, t, -1)
        attn = block.attn
        if getattr(attn, "norm", None) is not None:
            merged = attn.norm(merged)
        return block.ls1(attn.proj(merged))

    def ffn(self, index: int, x: torch.Tensor) -> torch.Tensor:
        block = self.blocks[index]
        return x + block.ls2(block.mlp(block.norm2(x)))

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm."""
        return self.model.norm(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return x if self.readout is None else self.readout(x)
