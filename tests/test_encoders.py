"""The model layer's adapters against the libraries' own forwards: open_clip ViTs and text towers as dense
primitives (``DenseEncoder``/``TextEncoder``)."""

import open_clip
import pytest
import torch
import torch.nn.functional as F

from vocabseg.errors import UsageError
from vocabseg.models.encoder import SCALE_PLUS_OFFSET, TO_SIZE, require_class_token
from vocabseg.models.openclip import InferenceQuickGELU, OpenCLIPViT, from_open_clip


def test_blocks_and_head_reproduce_open_clip_image_embedding(clip, tiny_model):
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = clip.image.run_blocks(clip.image.embed(images))
        ours = clip.image.head(tokens)[:, 0]
        theirs = tiny_model.encode_image(images)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_qkv_matches_multihead_attention(clip):
    encoder = clip.image
    x = encoder.embed(torch.randn(1, 3, 64, 64))
    block = encoder.blocks[0]
    with torch.no_grad():
        q, k, v = encoder.qkv(0, x)
        heads = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v
        ours = encoder.attention_out(0, heads)
        z = block.ln_1(x)
        theirs = block.attn(z, z, z, need_weights=False)[0]
    assert q.shape == (1, encoder.num_heads, 1 + 16, encoder.width // encoder.num_heads)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_truncated_text_forward_equals_full_length(clip, tiny_model):
    texts = ["a photo of a cat.", "a bad photo of the dining table.", "x", "a tattoo of the television monitor."]
    with torch.no_grad():
        full = tiny_model.encode_text(open_clip.tokenize(texts))
        truncated = clip.text.encode(texts)
    assert (full - truncated).abs().max() <= 1e-5


def test_position_resize_operations(clip):
    encoder = clip.image
    native = encoder.positions(4, 4, SCALE_PLUS_OFFSET)
    torch.testing.assert_close(native[1:], encoder.visual.positional_embedding[1:])  # native grid, square: as is
    scaled = encoder.positions(5, 7, SCALE_PLUS_OFFSET)
    direct = encoder.positions(5, 7, TO_SIZE)
    assert scaled.shape == direct.shape == (1 + 35, encoder.width)
    torch.testing.assert_close(scaled[0], native[0])  # class token kept
    grid = encoder.visual.positional_embedding[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, scale_factor=(5.1 / 4, 7.1 / 4), mode="bicubic", align_corners=False)
    torch.testing.assert_close(scaled[1:], expected.permute(0, 2, 3, 1).reshape(35, -1))
    assert not torch.allclose(scaled, direct)  # the +0.1 trick samples other positions


def test_grid_floors_like_the_patch_convolution(clip):
    assert clip.image.grid(336, 447) == (21, 27)
    with torch.no_grad():
        assert clip.image.embed(torch.randn(1, 3, 40, 70)).shape[1] == 1 + 2 * 4


def test_rejects_towers_the_primitives_would_misread():
    model = open_clip.model.CLIP(embed_dim=16, vision_cfg=dict(layers=(1, 1, 1, 1), width=8, image_size=64),
                                 text_cfg=dict(width=16, heads=2, layers=1))
    with pytest.raises(UsageError, match="ViT image tower"):
        from_open_clip(model)
    scaled = open_clip.model.CLIP(embed_dim=16, vision_cfg=dict(layers=1, width=64, head_width=32, image_size=32,
                                                                patch_size=16, scale_attn=True),
                                  text_cfg=dict(width=16, heads=2, layers=1))
    with pytest.raises(UsageError, match="CustomResidualAttentionBlock blocks"):
        OpenCLIPViT(scaled.visual)


def test_inference_quickgelu_matches_quickgelu_and_keeps_gradients():
    from open_clip.transformer import QuickGELU

    x = torch.randn(4, 7, 33) * 3
    expected = QuickGELU()(x)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            buffer = x.clone()
            out = InferenceQuickGELU()(buffer)
        assert out.data_ptr() == buffer.data_ptr()  # in place: no new buffer
        torch.testing.assert_close(out, expected, rtol=3e-7, atol=1e-6)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    InferenceQuickGELU()(a).sum().backward()
    QuickGELU()(b).sum().backward()
    assert torch.equal(a.grad, b.grad)


def test_image_tower_quickgelu_is_swapped(clip):
    from open_clip.transformer import QuickGELU

    kinds = [type(m) for m in clip.image.visual.modules()]
    assert QuickGELU not in kinds
    assert kinds.count(InferenceQuickGELU) == clip.image.num_blocks


def test_mmseg_variant_shares_the_weights(clip):
    variant = clip.image.variant(layer_norm_eps=1e-6, exact_gelu=True)
    assert variant is clip.image.variant(layer_norm_eps=1e-6, exact_gelu=True)  # memoised
    assert variant.visual.conv1.weight is clip.image.visual.conv1.weight  # shared, not copied
    assert variant.visual.ln_post.eps == 1e-6 and clip.image.visual.ln_post.eps == 1e-5
    assert any(isinstance(m, torch.nn.GELU) for m in variant.visual.modules())


def test_class_token_requirement_is_a_clear_error(clip):
    require_class_token(clip.image, "cliptrase")
    no_class = type("NoClass", (), {"prefix_tokens": 0, "name": "SigLIP"})()
    with pytest.raises(UsageError, match="cliptrase reads the image encoder's class token"):
        require_class_token(no_class, "cliptrase")
