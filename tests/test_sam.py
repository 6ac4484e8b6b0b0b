"""SAM as a helper model: every checkpoint layout loads into the official modules, the dense primitives equal the
package's own forward, and missing weights give a clear error."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch
from oracle import oracle_path

from vocabseg.models import sam as sam_module
from vocabseg.models.factory import WeightsError
from vocabseg.models.sam import SamConfig, build_model, load_sam, read_sam

TINY = SamConfig(embed_dim=48, depth=2, num_heads=6, global_attn_indexes=(1,), window_size=7, img_size=256,
                 out_chans=32)


def _random_sam(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(TINY)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor) * (0.1 if "rel_pos" in name else 0.2))
    return model


# transformers' SamModel names, written out from its layout (not derived from the loader's map)
_OFFICIAL_TO_HF = [
    ("image_encoder.", "vision_encoder."), ("patch_embed.proj.", "patch_embed.projection."),
    ("vision_encoder.blocks.", "vision_encoder.layers."), ("neck.0.", "neck.conv1."), ("neck.1.", "neck.layer_norm1."),
    ("neck.2.", "neck.conv2."), ("neck.3.", "neck.layer_norm2."), ("mask_downscaling.0.", "mask_embed.conv1."),
    ("mask_downscaling.1.", "mask_embed.layer_norm1."), ("mask_downscaling.3.", "mask_embed.conv2."),
    ("mask_downscaling.4.", "mask_embed.layer_norm2."), ("mask_downscaling.6.", "mask_embed.conv3."),
    ("point_embeddings.", "point_embed."), ("output_upscaling.0.", "upscale_conv1."),
    ("output_upscaling.1.", "upscale_layer_norm."), ("output_upscaling.3.", "upscale_conv2."),
    ("norm_final_attn.", "layer_norm_final_attn."), (".norm1.", ".layer_norm1."), (".norm2.", ".layer_norm2."),
    (".norm3.", ".layer_norm3."), (".norm4.", ".layer_norm4."),
]


def _hf_key(key: str) -> str:
    if key == "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix":
        return "shared_image_embedding.positional_embedding"
    for official, hf in _OFFICIAL_TO_HF:
        key = key.replace(official, hf)
    if "output_hypernetworks_mlps" in key or "iou_prediction_head" in key:
        key = key.replace("layers.0.", "proj_in.").replace("layers.1.", "layers.0.").replace("layers.2.", "proj_out.")
    return key


def _assert_same_weights(loaded, model):
    reference = model.state_dict()
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_official_layout_loads_every_part(tmp_path):
    model = _random_sam()
    path = tmp_path / "sam_tiny.pth"
    torch.save(model.state_dict(), path)
    loaded = read_sam(path)
    assert loaded.config == TINY and loaded.has_decoder
    _assert_same_weights(loaded, model)


def test_factory_loads_sam_once_per_request(tmp_path):
    from vocabseg.models.factory import load_model

    path = tmp_path / "sam_tiny.pth"
    torch.save(_random_sam(5).state_dict(), path)
    loaded = load_model("sam", str(path), "cpu")
    assert isinstance(loaded, sam_module.SamModel) and loaded.source == str(path.resolve())
    assert load_model("sam", str(path), "cpu") is loaded
    assert loaded.fingerprint() == read_sam(path).fingerprint()


def test_transformers_layout_loads_into_the_official_modules(tmp_path):
    from safetensors.torch import save_file

    model = _random_sam(1)
    state = {_hf_key(k): v.clone() for k, v in model.state_dict().items()}
    assert "vision_encoder.layers.1.layer_norm1.weight" in state
    assert "mask_decoder.iou_prediction_head.proj_out.bias" in state
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    loaded = read_sam(path)
    assert loaded.config == TINY
    _assert_same_weights(loaded, model)


def test_encoder_only_layout_has_no_decoder(tmp_path):
    model = _random_sam(2)
    path = tmp_path / "encoder.pt"
    torch.save({k[len("image_encoder."):]: v.half() for k, v in model.state_dict().items()
                if k.startswith("image_encoder.")}, path)
    loaded = read_sam(path)
    assert not loaded.has_decoder and loaded.config.describe().endswith("(image encoder only)")
    reference = model.image_encoder.half().float().state_dict()
    for name, tensor in loaded.encoder.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    with pytest.raises(ValueError, match="prompt encoder and mask decoder"):
        loaded.require_decoder("SAM refinement")


def test_timm_samvit_layout_gives_timm_outputs(tmp_path):
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    torch.manual_seed(4)
    timm_model = VisionTransformerSAM(img_size=256, patch_size=16, embed_dim=48, depth=2, num_heads=6,
                                      global_attn_indexes=(1,), window_size=7, use_rel_pos=True, neck_chans=32,
                                      num_classes=0).eval()
    with torch.no_grad():
        for name, tensor in timm_model.state_dict().items():
            if "rel_pos" in name:
                tensor.normal_(0, 0.1)
    path = tmp_path / "samvit.safetensors"
    from safetensors.torch import save_file

    save_file(timm_model.state_dict(), str(path))
    loaded = read_sam(path)
    assert loaded.config == dataclasses.replace(TINY, has_decoder=False)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (loaded.encoder(x) - timm_model.forward_features(x)).abs().max()
    assert difference < 1e-4, difference  # two implementations of the same network (timm's fused attention)


def test_oracle_tiny_encoder_loads_with_its_configuration():
    """The oracle's tiny SAM ViT-B image encoder (its outputs are checked against the Trident goldens)."""
    loaded = load_sam(str(oracle_path("vfm", "tiny_sam_vitb_image_encoder.pt")))
    assert (loaded.num_heads, loaded.config.global_attn_indexes, loaded.config.window_size) == (12, (1, 3), 14)
    assert (loaded.config.embed_dim, loaded.config.depth, loaded.has_decoder) == (96, 4, False)


def test_last_block_primitives_equal_the_block_forward():
    sam = sam_module.SamModel(_random_sam(3), TINY)
    image = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    x, size = sam.preprocess(image)
    assert x.shape == (1, 3, 256, 256) and size == (192, 256)
    with torch.no_grad():
        tokens = sam.run_blocks(sam.embed(x), 0, 1)
        q, k, v = sam.qkv(1, tokens)
        grid = tuple(tokens.shape[1:3])
        attention = sam.attention_logits(1, q, k, grid).softmax(-1)
        ours = sam.neck(sam.finish_block(1, tokens, attention @ v))
        assert torch.allclose(ours, sam.encoder(x), atol=1e-5)
        rows = sam.attention_logits(1, q, k, grid, rows=(5, 7))
        full = sam.attention_logits(1, q, k, grid).view(1, 6, *grid, -1)[:, :, :5, :7].reshape(1, 6, 35, -1)
        assert torch.allclose(rows, full, atol=1e-6)
        with pytest.raises(ValueError, match="windowed"):
            sam.qkv(0, tokens)


def test_missing_weights_offline_fail_at_once_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(WeightsError, match=r"--model sam=PATH"):
        load_sam("vit_b")
    with pytest.raises(WeightsError, match="Unknown SAM weights"):
        load_sam("vit_q")


def test_checkpoints_with_code_are_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"image_encoder.pos_embed": Payload()}, handle)
    with pytest.raises(WeightsError):
        read_sam(path)


# --- SAM 2 (the optional sam2 package; part of the test extra) ----------------------------------------------------

def test_sam2_official_checkpoint_loads_by_file_name(tmp_path):
    pytest.importorskip("sam2", reason="the optional sam2 package is part of the test extra")
    from sam2.build_sam import build_sam2

    from vocabseg.models.sam import load_sam2

    torch.manual_seed(0)
    reference = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu", apply_postprocessing=False)
    state = {k: v.half() for k, v in reference.state_dict().items()}
    path = tmp_path / "sam2.1_hiera_tiny.pt"  # the official name tells the architecture
    torch.save({"model": state}, path)
    loaded = load_sam2(str(path))
    assert loaded.source == str(path.resolve()) and loaded.name == "SAM 2 (sam2.1_hiera_t)"
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, state[name].to(tensor.dtype)), name
    renamed = tmp_path / "my_sam2.pt"
    path.rename(renamed)
    with pytest.raises(WeightsError, match="config"):
        load_sam2(str(renamed))
    assert load_sam2(str(renamed), arch="configs/sam2.1/sam2.1_hiera_t.yaml") is not None


def test_sam2_tags_offline_fail_with_instructions(tmp_path, monkeypatch):
    pytest.importorskip("sam2", reason="the optional sam2 package is part of the test extra")
    from vocabseg.models.sam import load_sam2

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(WeightsError, match=r"sam2\.1_hiera_large\.pt"):
        load_sam2("facebook/sam2.1-hiera-large")
    with pytest.raises(WeightsError, match="Unknown SAM 2 weights"):
        load_sam2("sam2-huge")
