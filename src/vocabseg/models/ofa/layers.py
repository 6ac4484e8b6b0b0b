"""OFA's transformer layers (pre-LN, NormFormer options), batch-first.

Attention: ``q`` is scaled by ``(head_dim * attn_scale_factor)^-1/2``; a float bias ``B,H,Tq,Tk`` (absolute and
relative position biases, causal ``-inf``, padding ``-inf``) is added to the logits; softmax in float32; each head's
output is scaled by ``c_attn`` before ``out_proj``. Layers: ``x + drop_path(attn_ln(attn(LN(x))))`` (the decoder adds a
cross-attention block of the same form), then ``x + drop_path(fc2(ffn_layernorm(gelu(fc1(LN(x))))))``. fairseq's
``gelu`` is the erf GELU computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vocabseg.models.ofa.config import OFAConfig
from vocabseg.models.ofa.resnet import drop_path


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x.float()).type_as(x)


class Attention(nn.Module):
    """Multi-head attention with an additive bias and per-head output scales (``c_attn``)."""

    def __init__(self, config: OFAConfig):
        super().__init__()
        dim = config.embed_dim
        self.heads, self.head_dim = config.heads, config.head_dim
        self.scaling = (self.head_dim * config.attn_scale_factor) ** -0.5
        self.dropout = config.attention_dropout
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.c_attn = nn.Parameter(torch.ones(self.heads)) if config.normformer else None

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``query`` ``B,Tq,D``, ``key`` (= value) ``B,Tk,D``, ``bias`` ``B,H,Tq,Tk`` -> ``B,Tq,D``."""
        q = self._split(self.q_proj(query) * self.scaling)
        k, v = self._split(self.k_proj(key)), self._split(self.v_proj(key))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0,
                                             dropout_p=self.dropout if self.training else 0.0)
        if self.c_attn is not None:
            out = out * self.c_attn.to(out.dtype)[None, :, None, None]
        return self.out_proj(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    """The FFN half of a layer: ``fc2(ffn_layernorm(gelu(fc1(x))))`` (parameters named as OFA's layer)."""

    def __init__(self, config: OFAConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.embed_dim, config.ffn_dim)
        self.fc2 = nn.Linear(config.ffn_dim, config.embed_dim)
        self.ffn_layernorm = nn.LayerNorm(config.ffn_dim) if config.normformer else None
        self.final_layer_norm = nn.LayerNorm(config.embed_dim)
        self.activation_dropout = config.activation_dropout

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(gelu(self.fc1(self.final_layer_norm(x))), self.activation_dropout, self.training)
        if self.ffn_layernorm is not None:
            x = self.ffn_layernorm(x)
        return self.fc2(x)


class _Layer(FeedForward):
    """A layer's residual connection: ``residual + drop_path(dropout(x))``."""

    def __init__(self, config: OFAConfig, drop_path_rate: float):
        super().__init__(config)
        self.self_attn = Attention(config)
        self.self_attn_layer_norm = nn.LayerNorm(config.embed_dim)
        self.dropout, self.drop_path_rate = config.dropout, drop_path_rate

    def _residual(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return residual + drop_path(F.dropout(x, self.dropout, self.training), self.drop_path_rate, self.training)


class EncoderLayer(_Layer):
    def __init__(self, config: OFAConfig, drop_path_rate: float):
        super().__init__(config, drop_path_rate)
        self.attn_ln = nn.LayerNorm(config.embed_dim) if config.normformer else None

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``x`` ``B,T,D``, ``bias`` ``B,H,T,T``."""
        h = self.self_attn_layer_norm(x)
        h = self.self_attn(h, h, bias)
        if self.attn_ln is not None:
            h = self.attn_ln(h)
        x = self._residual(h, x)
        return self._residual(self.ffn(x), x)


class DecoderLayer(_Layer):
    def __init__(self, config: OFAConfig, drop_path_rate: float):
        super().__init__(config, drop_path_rate)
        self.self_attn_ln = nn.LayerNorm(config.embed_dim) if config.normformer else None
        self.cross_attn_ln = nn.LayerNorm(config.embed_dim) if config.normformer else None
        self.encoder_attn = Attention(config)
        self.encoder_attn_layer_norm = nn.LayerNorm(config.embed_dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, self_bias: torch.Tensor, cross_bias: torch.Tensor
                ) -> torch.Tensor:
        """``x`` ``B,S,D`` attends to itself (``self_bias`` ``B,H,S,S``) and to ``memory`` ``B,T,D``
        (``cross_bias`` ``B,H,S,T``)."""
        h = self.self_attn_layer_norm(x)
        h = self.self_attn(h, h, self_bias)
        if self.self_attn_ln is not None:
            h = self.self_attn_ln(h)
        x = self._residual(h, x)
        h = self.encoder_attn(self.encoder_attn_layer_norm(x), memory, cross_bias)
        if self.cross_attn_ln is not None:
            h = self.cross_attn_ln(h)
        x = self._residual(h, x)
        return self._residual(self.ffn(x), x)
