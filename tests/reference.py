"""Direct, loop-by-head reference computations from the raw open_clip parameters, shared by the recipe tests."""

import torch


def softmax_rows(scores: torch.Tensor) -> torch.Tensor:
    """Row softmax written out (max-subtracted exponentials over their sum)."""
    scores = scores - scores.max(dim=-1, keepdim=True).values
    e = scores.exp()
    return e / e.sum(dim=-1, keepdim=True)


def embed(model, images: torch.Tensor) -> torch.Tensor:
    """Patch embedding, class token, the model's positional embedding and ``ln_pre``."""
    visual = model.visual
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + visual.positional_embedding
    return visual.ln_pre(x)


def heads(block, x: torch.Tensor):
    """q, k, v of a block as lists of per-head ``B,T,hd`` tensors, from the raw in_proj parameters."""
    z = block.ln_1(x)
    width = z.shape[-1]
    hd = width // block.attn.num_heads
    w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
    q, k, v = (z @ w[i * width:(i + 1) * width].T + b[i * width:(i + 1) * width] for i in range(3))
    split = [slice(h * hd, (h + 1) * hd) for h in range(block.attn.num_heads)]
    return [q[..., s] for s in split], [k[..., s] for s in split], [v[..., s] for s in split]
