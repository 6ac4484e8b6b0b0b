"""Class-agnostic masks: SAM automatic masks cached per image (a second call computes nothing), CorrCLIP's mask files,
and their use as MAFT proposals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle import oracle_path

from vocabseg.methods.maft import proposals as P
from vocabseg.models import masks as M
from vocabseg.models.sam import SamConfig, build_model, load_sam

TINY = SamConfig(embed_dim=48, depth=2, num_heads=6, global_attn_indexes=(1,), window_size=7, img_size=256,
                 out_chans=32)
# every point's mask is kept: no IoU or stability filter (random decoder weights predict poor IoUs)
SETTINGS = M.MaskSettings(points_per_side=3, points_per_batch=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)


@pytest.fixture(scope="module")
def sam_file(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(TINY)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor) * 0.2)
    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)


def _counting(generator, monkeypatch):
    calls = []
    original = generator.compute

    def compute(image):
        calls.append(image.shape)
        return original(image)

    monkeypatch.setattr(generator, "compute", compute)
    return calls


def test_masks_are_cached_per_image_and_settings(sam_file, image, tmp_path, monkeypatch):
    generator = M.MaskGenerator("sam", str(sam_file), settings=SETTINGS, cache=tmp_path)
    calls = _counting(generator, monkeypatch)
    first = generator.masks(image)
    assert first.dtype == bool and first.shape[1:] == image.shape[:2] and len(first) > 0
    assert len(calls) == 1 and len(list(tmp_path.glob("*.npz"))) == 1
    again = M.MaskGenerator("sam", str(sam_file), settings=SETTINGS, cache=tmp_path)  # a new process, same cache
    again_calls = _counting(again, monkeypatch)
    assert np.array_equal(again.masks(image), first)
    assert again_calls == []  # served from the cache: nothing computed
    other = image.copy()
    other[0, 0, 0] ^= 1
    again.masks(other)
    assert len(again_calls) == 1  # another image computes
    changed = M.MaskGenerator("sam", str(sam_file), settings=M.MaskSettings(**{**SETTINGS.__dict__,
                                                                                "points_per_side": 2}),
                              cache=tmp_path)
    changed_calls = _counting(changed, monkeypatch)
    changed.masks(image)
    assert len(changed_calls) == 1  # other settings compute


def test_generator_equals_the_package_generator(sam_file, image):
    from segment_anything import SamAutomaticMaskGenerator

    generator = M.MaskGenerator("sam", str(sam_file), settings=SETTINGS, cache=False)
    ours = generator.masks(image)
    model = load_sam(str(sam_file)).model
    theirs = SamAutomaticMaskGenerator(model, points_per_side=3, points_per_batch=4, pred_iou_thresh=0.0,
                                       stability_score_thresh=0.0).generate(image)
    assert np.array_equal(ours, np.stack([r["segmentation"] for r in theirs]))
    loaded = M.MaskGenerator("sam", load_sam(str(sam_file)), settings=SETTINGS, cache=False)  # a loaded model
    assert np.array_equal(loaded.masks(image), ours)


def test_encoder_only_weights_cannot_generate(image, tmp_path):
    path = tmp_path / "encoder.pt"
    model = build_model(TINY)
    torch.save({k[len("image_encoder."):]: v for k, v in model.state_dict().items()
                if k.startswith("image_encoder.")}, path)
    with pytest.raises(ValueError, match="prompt encoder and mask decoder"):
        M.MaskGenerator("sam", str(path), cache=False).masks(image)


def test_corrclip_mask_file_becomes_maft_proposals():
    proposals = P.read_proposal_file(oracle_path("corrclip", "masks", "voc.npz"), (94, 125))
    assert proposals.masks.shape == (5, 94, 125)  # regions 1, 2, 3, 4, 6 (0 = unsegmented is no proposal)


def test_automatic_masks_as_a_region_source(sam_file, image, tmp_path, monkeypatch):
    """``sam:WEIGHTS`` as CorrCLIP's region-mask source: the cached masks painted into an id map."""
    from vocabseg.models.region_masks import mask_source, paint_regions

    monkeypatch.setenv("VOCABSEG_CACHE", str(tmp_path))
    monkeypatch.setattr(M, "MaskSettings", lambda: SETTINGS)
    ids = mask_source(f"sam:{sam_file}")(torch.from_numpy(image), "photo")
    masks = M.MaskGenerator("sam", str(sam_file), settings=SETTINGS, cache=tmp_path / "masks").masks(image)
    assert torch.equal(ids, paint_regions(torch.from_numpy(masks)))
    assert len(list((tmp_path / "masks").glob("*.npz"))) == 1  # one computation served both


def test_sam_proposals_for_maft(sam_file, image, tmp_path, monkeypatch):
    monkeypatch.setenv("VOCABSEG_CACHE", str(tmp_path))
    monkeypatch.setattr(M, "MaskSettings", lambda: SETTINGS)
    proposals = P.sam_proposals(torch.from_numpy(image), str(sam_file))
    assert proposals.masks.shape[1:] == image.shape[:2] and proposals.source == "sam"
    assert len(list((tmp_path / "masks").glob("*.npz"))) == 1
    with pytest.raises(ValueError, match="sam_weights"):
        P.sam_proposals(torch.from_numpy(image), "")
