import torch
import torch.nn.functional as F

from vocabseg.models.openclip import CLIPBackbone


def test_blocks_and_head_reproduce_open_clip_image_embedding(backbone, tiny_model):
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = backbone.run_blocks(backbone.embed(images))
        ours = backbone.head(tokens)[:, 0]
        theirs = tiny_model.encode_image(images)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_qkv_matches_multihead_attention(backbone):
    x = backbone.embed(torch.randn(1, 3, 64, 64))
    block = backbone.blocks[0]
    with torch.no_grad():
        q, k, v = backbone.qkv(0, x)
        heads = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v
        ours = backbone.attention_out(0, heads)
        z = block.ln_1(x)
        theirs = block.attn(z, z, z, need_weights=False)[0]
    assert q.shape == (1, backbone.num_heads, 1 + 16, backbone.width // backbone.num_heads)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_truncated_text_forward_equals_full_length(backbone, tiny_model):
    texts = ["a photo of a cat.", "a bad photo of the dining table.", "x", "a tattoo of the television monitor."]
    with torch.no_grad():
        full = tiny_model.encode_text(backbone.tokenize(texts))
        truncated = backbone.encode_text(texts)
    assert (full - truncated).abs().max() <= 1e-5


def test_positional_embedding_dino_resize(backbone):
    native = backbone.positional_embedding(4, 4)
    assert native is backbone.visual.positional_embedding
    dino = backbone.positional_embedding(5, 7, "dino")
    direct = backbone.positional_embedding(5, 7, "size")
    assert dino.shape == direct.shape == (1 + 35, backbone.width)
    torch.testing.assert_close(dino[0], native[0])  # class token kept
    grid = native[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, scale_factor=(5.1 / 4, 7.1 / 4), mode="bicubic", align_corners=False)
    torch.testing.assert_close(dino[1:], expected.permute(0, 2, 3, 1).reshape(35, -1))
    assert not torch.allclose(dino, direct)  # the +0.1 trick samples other positions


def test_grid_floors_like_the_patch_convolution(backbone):
    assert backbone.grid(336, 447) == (21, 27)
    with torch.no_grad():
        assert backbone.embed(torch.randn(1, 3, 40, 70)).shape[1] == 1 + 2 * 4


def test_rejects_non_vit_image_towers():
    import open_clip
    import pytest

    model = open_clip.model.CLIP(embed_dim=16, vision_cfg=dict(layers=(1, 1, 1, 1), width=8, image_size=64),
                                 text_cfg=dict(width=16, heads=2, layers=1))
    with pytest.raises(ValueError, match="plain ViT"):
        CLIPBackbone(model)


def test_inference_quickgelu_matches_quickgelu_and_keeps_gradients():
    from open_clip.transformer import QuickGELU

    from vocabseg.models.openclip import InferenceQuickGELU

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


def test_backbone_swaps_quickgelu_in_both_towers(backbone):
    from open_clip.transformer import QuickGELU

    from vocabseg.models.openclip import InferenceQuickGELU

    kinds = [type(m) for m in backbone.model.modules()]
    assert QuickGELU not in kinds
    assert kinds.count(InferenceQuickGELU) == backbone.num_blocks + len(backbone.model.transformer.resblocks)
