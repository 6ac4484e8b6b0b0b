"""IP-CLIP: naive vs split paths, no-op equivalences, masking semantics, freeze policy (spec A.11.3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CFG, make_tiny_clip
from PIL import Image

from vocabseg.methods.maft.ipclip import (
    IPCLIP,
    MAFT_NORMALIZATION,
    grid_masks,
    is_trainable,
    padded_size,
    prepare_image,
    resize_shortest_edge,
    set_trainable,
)
from vocabseg.models.encoder import TO_SIZE_ALIGNED
from vocabseg.models.openclip import from_open_clip

FOUR_BLOCKS = {**TINY_CFG, "vision_cfg": {**TINY_CFG["vision_cfg"], "layers": 4}}


@pytest.fixture(scope="module")
def model4():
    return make_tiny_clip(1, FOUR_BLOCKS)


@pytest.fixture(scope="module")
def bb4(model4):
    """The four-block tiny CLIP's image encoder."""
    return from_open_clip(model4, name="tiny4").image


def _inputs(n, seed=0, size=96, batch=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    masks = (torch.rand(batch, n, size, size, generator=g) > 0.5).float()
    masks = F.avg_pool2d(masks, 9, 1, 4)  # soft, spatially smooth proposals
    return images, masks


@torch.no_grad()
@pytest.mark.parametrize("n", [1, 3, 100, 250])
def test_split_equals_naive(bb4, n):
    images, masks = _inputs(n, seed=n)
    naive = IPCLIP(bb4, path="naive").encode(images, masks)
    split = IPCLIP(bb4, path="split", chunk=64).encode(images, masks)
    assert naive.shape == (1, n, 32)
    torch.testing.assert_close(split, naive, atol=1e-5, rtol=1e-5)
    # proposals must actually change the embeddings (otherwise the comparison proves nothing)
    assert (naive - naive[:, :1]).abs().max() > 1e-3 or n == 1


@torch.no_grad()
def test_no_masks_is_plain_clip(clip, tiny_model):
    images = torch.randn(2, 3, 64, 64)
    ours = IPCLIP(clip.image).encode(images)
    reference = F.normalize(tiny_model.encode_image(images), dim=-1)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_full_masks_reproduce_plain_class_token(clip, tiny_model):
    """With the last block masked, an all-ones mask sees exactly what plain CLIP's class token sees."""
    images = torch.randn(2, 3, 64, 64)
    reference = F.normalize(tiny_model.encode_image(images), dim=-1)
    ones = torch.ones(2, 3, 64, 64)
    encoder = clip.image
    for path in ("naive", "split"):
        out = IPCLIP(encoder, start_layer=encoder.num_blocks - 1, path=path).encode(images, ones)
        torch.testing.assert_close(out, reference[:, None].expand(-1, 3, -1), atol=1e-5, rtol=1e-5)
    # no masked block at all: every copy is the vanilla class token, whatever the masks
    random = torch.rand(2, 3, 64, 64)
    out = IPCLIP(encoder, start_layer=encoder.num_blocks).encode(images, random)
    torch.testing.assert_close(out, reference[:, None].expand(-1, 3, -1), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_empty_mask_attends_only_to_itself(bb4):
    images, masks = _inputs(2, seed=5)
    masks[0, 1] = 0
    ip = IPCLIP(bb4)
    out = ip.encode(images, masks)
    cls = bb4.run_blocks(bb4.embed(images, TO_SIZE_ALIGNED), 0, ip.start_layer)[:, :1]
    for index in range(ip.start_layer, bb4.num_blocks):
        _, _, v = bb4.qkv(index, cls)  # attention to itself alone returns its own value
        cls = bb4.ffn(index, cls + bb4.attention_out(index, v))
    torch.testing.assert_close(out[:, 1], F.normalize(bb4.head(cls), dim=-1)[:, 0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


@torch.no_grad()
def test_permutation_and_batch_independence(bb4):
    images, masks = _inputs(5, seed=2, batch=2)
    ip = IPCLIP(bb4)
    out = ip.encode(images, masks)
    perm = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(ip.encode(images, masks[:, perm]), out[:, perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ip.encode(images[1:], masks[1:]), out[1:], atol=1e-5, rtol=1e-5)


def test_grid_mask_threshold_and_resize():
    # same size: the threshold is inclusive at 0.5
    soft = torch.tensor([[0.5, 0.4999], [1.0, 0.0]])[None, None]
    assert grid_masks(soft, (2, 2)).reshape(-1).tolist() == [True, False, True, False]
    # 2x downsample, align_corners=False = mean of each 2x2 block: 2/4 ones -> 0.5 kept, 1/4 -> 0.25 dropped
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, 0, 0:2] = 1  # top-left block: two ones
    mask[0, 0, 2, 2] = 1  # bottom-right block: one one
    assert grid_masks(mask, (2, 2)).reshape(-1).tolist() == [True, False, False, False]
    # a mask smaller than a patch vanishes, unless keep_small keeps its best patch
    tiny = torch.zeros(1, 1, 64, 64)
    tiny[0, 0, 40:42, 50:52] = 1
    assert not grid_masks(tiny, (4, 4)).any()
    kept = grid_masks(tiny, (4, 4), keep_small=True).reshape(4, 4)
    assert kept.sum() == 1 and kept[2, 3]
    assert not grid_masks(torch.zeros(1, 1, 64, 64), (4, 4), keep_small=True).any()


def test_prepare_image_normalises_then_resizes():
    image = torch.full((10, 20, 3), 255, dtype=torch.uint8)
    x = prepare_image(image, 32)
    assert x.shape == (1, 3, 32, 32)
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([(255 - 0.48145466 * 255) / (0.26862954 * 255),
                                                            (255 - 0.4578275 * 255) / (0.26130258 * 255),
                                                            (255 - 0.40821073 * 255) / (0.27577711 * 255)]))


def test_prepare_image_pads_to_the_size_divisibility():
    image = torch.randint(0, 256, (10, 20, 3), dtype=torch.uint8)
    exact = prepare_image(image, 32, multiple=32)  # zero-padded to 32 x 32: the resize is the identity
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (MAFT_NORMALIZATION.mean, MAFT_NORMALIZATION.std))
    torch.testing.assert_close(exact[0, :, :10, :20], (image.permute(2, 0, 1).float() - mean) / std)
    assert not torch.allclose(prepare_image(image, 32), exact)  # unpadded, the image fills the whole 32 x 32
    assert (exact[..., 10:, :] == 0).all() and (exact[..., 20:] == 0).all()
    assert padded_size(188, 250, 32) == (192, 256) and padded_size(188, 250, 0) == (188, 250)


def test_resize_shortest_edge_sizes():
    image = torch.randint(0, 256, (188, 250, 3), dtype=torch.uint8)
    assert resize_shortest_edge(image, 320).shape == (320, 426, 3)  # 250 * 320 / 188 = 425.5 -> 426
    assert resize_shortest_edge(image, 320, max_size=400).shape == (301, 400, 3)  # long side capped
    assert resize_shortest_edge(image, 188) is image
    expected = np.asarray(Image.fromarray(image.numpy()).resize((426, 320), Image.BILINEAR))
    assert np.array_equal(resize_shortest_edge(image, 320).numpy(), expected)


def test_freeze_policy(bb4, model4):
    model = model4
    names = set(set_trainable(model, "maft"))
    d = bb4.width
    per_block = 4 * d * d + 8 * d  # in_proj (3D^2+3D), out_proj (D^2+D), ln_1 and ln_2 (2D each)
    expected = per_block * bb4.num_blocks + 2 * d  # plus ln_post
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == expected
    assert "visual.ln_post.weight" in names and "visual.transformer.resblocks.0.ln_1.weight" in names
    assert not any(".mlp." in n or n.startswith(("visual.conv1", "visual.proj", "visual.positional")) for n in names)
    assert not any(not n.startswith("visual.") for n in names)  # text tower frozen
    assert 4 * 768 * 768 + 8 * 768 == 2_365_440  # the spec's 2.36 M per ViT-B/16 block
    # after one backward only those parameters have gradients
    images, masks = _inputs(2, seed=3)
    IPCLIP(bb4).encode(images, masks).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == names
    set_trainable(model, "all")
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(False)
    assert is_trainable("visual.transformer.resblocks.3.attn.out_proj.weight", "attention")
    with pytest.raises(ValueError, match="freeze policy"):
        is_trainable("visual.ln_post.weight", "nonsense")


@torch.no_grad()
@pytest.mark.parametrize("path", ["naive", "split"])
def test_padding_with_empty_proposals_changes_no_other(bb4, path):
    """What lets images with different proposal counts share a pass."""
    images, masks = _inputs(3, seed=7)
    ip = IPCLIP(bb4, path=path)
    allowed = ip.allowed_patches(images, masks)
    padded = torch.cat([allowed, torch.zeros(1, 2, allowed.shape[-1], dtype=torch.bool)], dim=1)
    torch.testing.assert_close(ip.encode_allowed(images, padded)[:, :3], ip.encode_allowed(images, allowed),
                               atol=1e-6, rtol=1e-6)


def test_refuses_encoders_without_exactly_one_class_token(bb4, monkeypatch):
    for count in (0, 2):
        monkeypatch.setattr(bb4, "prefix_tokens", count)
        with pytest.raises(ValueError, match="class token"):
            IPCLIP(bb4)
