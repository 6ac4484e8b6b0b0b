"""The DINO/DINOv2 helper model: every checkpoint layout loads into the same network, whose forward equals a direct
computation of the official algorithm (including its position-embedding resize); clear errors without weights."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vocabseg.models.dino import DINO_TAGS, infer_config, load_dino, read_dino
from vocabseg.models.factory import WeightsError, load_model
from vocabseg.models.timm_vit import TimmViT

WIDTH, DEPTH, PATCH, GRID = 128, 2, 8, 4


def official_state(registers: int = 0, layer_scale: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict in the official facebookresearch layout (DINO, DINOv2, DINOv2 with registers)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.2, mean=0.0):
        return mean + std * torch.randn(*shape, generator=generator)

    d = WIDTH
    state = {"cls_token": rand(1, 1, d), "pos_embed": rand(1, 1 + GRID * GRID, d),
             "patch_embed.proj.weight": rand(d, 3, PATCH, PATCH, std=0.1), "patch_embed.proj.bias": rand(d)}
    if layer_scale:
        state["mask_token"] = rand(1, d)
    if registers:
        state["register_tokens"] = rand(1, registers, d)
    for i in range(DEPTH):
        p = f"blocks.{i}."
        state.update({
            p + "norm1.weight": rand(d, std=0.1, mean=1.0), p + "norm1.bias": rand(d, std=0.05),
            p + "attn.qkv.weight": rand(3 * d, d), p + "attn.qkv.bias": rand(3 * d, std=0.05),
            p + "attn.proj.weight": rand(d, d, std=0.05), p + "attn.proj.bias": rand(d, std=0.02),
            p + "norm2.weight": rand(d, std=0.1, mean=1.0), p + "norm2.bias": rand(d, std=0.05),
            p + "mlp.fc1.weight": rand(4 * d, d, std=0.06), p + "mlp.fc1.bias": rand(4 * d, std=0.02),
            p + "mlp.fc2.weight": rand(d, 4 * d, std=0.04), p + "mlp.fc2.bias": rand(d, std=0.02),
        })
        if layer_scale:
            state[p + "ls1.gamma"] = rand(d, std=0.3, mean=0.5)
            state[p + "ls2.gamma"] = rand(d, std=0.3, mean=0.5)
    state.update({"norm.weight": rand(d, std=0.1, mean=1.0), "norm.bias": rand(d, std=0.05)})
    return state


def reference_tokens(state: dict[str, torch.Tensor], images: torch.Tensor, registers: int) -> torch.Tensor:
    """The official ``prepare_tokens`` + blocks + final norm, computed directly from the official-layout tensors."""
    b, _, height, width = images.shape
    x = F.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=PATCH)
    gh, gw = x.shape[-2:]
    x = torch.cat([state["cls_token"].expand(b, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    pos = state["pos_embed"]
    if (gh, gw) != (GRID, GRID) or height != width:
        grid = pos[:, 1:].reshape(1, GRID, GRID, -1).permute(0, 3, 1, 2)
        if registers:  # DINOv2 hub entries with registers: exact size, antialiased
            grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", antialias=True)
        else:  # DINO and DINOv2: scale factors with the +0.1 offset
            grid = F.interpolate(grid, scale_factor=((gh + 0.1) / GRID, (gw + 0.1) / GRID), mode="bicubic")
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1)
    x = x + pos
    if registers:
        x = torch.cat([x[:, :1], state["register_tokens"].expand(b, -1, -1), x[:, 1:]], dim=1)
    heads = WIDTH // 64
    for i in range(DEPTH):
        p = f"blocks.{i}."

        def norm(t, name, p=p):
            return F.layer_norm(t, (WIDTH,), state[p + name + ".weight"], state[p + name + ".bias"], eps=1e-6)

        qkv = F.linear(norm(x, "norm1"), state[p + "attn.qkv.weight"], state[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, x.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
        attention = ((q @ k.transpose(-2, -1)) / math.sqrt(64)).softmax(-1) @ v
        out = F.linear(attention.transpose(1, 2).reshape(b, -1, WIDTH), state[p + "attn.proj.weight"],
                       state[p + "attn.proj.bias"])
        x = x + out * state.get(p + "ls1.gamma", 1.0)
        hidden = F.gelu(F.linear(norm(x, "norm2"), state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"]))
        mlp = F.linear(hidden, state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
        x = x + mlp * state.get(p + "ls2.gamma", 1.0)
    return F.layer_norm(x, (WIDTH,), state["norm.weight"], state["norm.bias"], eps=1e-6)


def tokens(encoder: TimmViT, images: torch.Tensor) -> torch.Tensor:
    """Normalised output of the last block, all tokens ``B,T,D`` (``get_intermediate_layers(x, n=1)[0]``)."""
    return encoder.head(encoder.run_blocks(encoder.embed(images)))


KINDS = {"dino": dict(registers=0, layer_scale=False), "dinov2": dict(registers=0, layer_scale=True),
         "dinov2_reg": dict(registers=4, layer_scale=True)}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [(32, 32), (48, 40), (32, 40)])
def test_official_layouts_match_the_official_forward(kind, size, tmp_path, one_thread):
    state = official_state(**KINDS[kind])
    path = tmp_path / "official.pth"
    torch.save(state, path)
    encoder = read_dino(path)
    assert infer_config(state).version == ("dino" if kind == "dino" else "dinov2")
    assert encoder.prefix_tokens == 1 + KINDS[kind]["registers"] and encoder.num_heads == 2
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = tokens(encoder, images)
        theirs = reference_tokens(state, images, KINDS[kind]["registers"])
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)
    assert encoder.grid(*size) == (size[0] // PATCH, size[1] // PATCH)


@pytest.mark.parametrize("kind", KINDS)
def test_timm_layout_and_training_checkpoints_load_the_same_network(kind, tmp_path, one_thread):
    from safetensors.torch import save_file

    official = tmp_path / "official.pth"
    torch.save(official_state(**KINDS[kind]), official)
    reference = read_dino(official)
    timm_file = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.model.state_dict().items()}, str(timm_file))
    training = tmp_path / "checkpoint.pth"
    teacher = {f"module.backbone.{k}": v for k, v in official_state(**KINDS[kind]).items()}
    teacher["module.head.last_layer.weight"] = torch.zeros(3, 4)
    torch.save({"teacher": teacher, "student": {"unused": torch.zeros(1)}, "epoch": 3}, training)
    images = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        expected = tokens(reference, images)
        for path in (timm_file, training):
            torch.testing.assert_close(tokens(read_dino(path), images), expected, atol=0, rtol=0)


def test_module_forward_matches_timm_forward_features(one_thread, tmp_path):
    """At the native square size (no resize) the dense primitives equal timm's own forward of the same module."""
    for kind in KINDS:
        torch.save(official_state(**KINDS[kind]), tmp_path / f"{kind}.pth")
        encoder = read_dino(tmp_path / f"{kind}.pth")
        images = torch.randn(2, 3, GRID * PATCH, GRID * PATCH)
        with torch.no_grad():
            torch.testing.assert_close(tokens(encoder, images), encoder.model.forward_features(images),
                                       atol=1e-5, rtol=1e-5)


def test_qkv_reproduces_the_block_attention(tmp_path, one_thread):
    torch.save(official_state(), tmp_path / "dino.pth")
    encoder = read_dino(tmp_path / "dino.pth")
    with torch.no_grad():
        x = encoder.embed(torch.randn(1, 3, 40, 40))
        q, k, v = encoder.qkv(0, x)
        heads = torch.softmax(q @ k.transpose(-1, -2) / 8, dim=-1) @ v
        block = encoder.blocks[0]
        ours = x + encoder.attention_out(0, heads)
        theirs = x + block.attn(block.norm1(x))
        masked = encoder.block(0, x, torch.zeros(26, 26))  # the rebuilt block (the path of an attention mask)
    assert q.shape == (1, 2, 1 + 25, 64)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked, block(x), atol=1e-5, rtol=1e-5)


def test_tiny_oracle_dino_is_the_official_layout():
    from oracle import oracle_path

    encoder = read_dino(oracle_path("vfm", "tiny_dino_vitb8.pt"))
    assert (encoder.patch_size, encoder.num_blocks, encoder.num_heads, encoder.width) == (8, 4, 2, 128)
    assert encoder.name == "DINO ViT-w128-d4/8" and encoder.source.endswith("tiny_dino_vitb8.pt")
    assert encoder.normalization.mean == (0.485, 0.456, 0.406) and encoder.position_resize.offset == 0.1


def test_loaded_once_per_process_through_the_factory(tmp_path):
    torch.save(official_state(), tmp_path / "dino.pth")
    first = load_model("dino", str(tmp_path / "dino.pth"), "cpu")
    assert isinstance(first, TimmViT)
    assert load_model("dino", str(tmp_path / "dino.pth"), "cpu") is first


def test_missing_weights_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    with pytest.raises(WeightsError) as error:
        load_dino()  # the default weights
    message = str(error.value)
    assert "dino_vitb8" in message and "--model dino=PATH" in message and "HF_HUB_OFFLINE" in message


def test_unknown_tag_and_foreign_checkpoint_are_clear_errors(tmp_path, tiny_weights):
    with pytest.raises(WeightsError, match="Unknown DINO weights 'dino_vitz3'"):
        load_dino("dino_vitz3")
    with pytest.raises(WeightsError, match="not a DINO/DINOv2 ViT checkpoint"):
        read_dino(tiny_weights)
    assert set(DINO_TAGS) >= {"dino_vitb8", "dino_vitb16", "dino_vits8", "dino_vits16", "dinov2_vitb14_reg"}


def test_cli_without_the_helper_model_offline_says_how_to_supply_it(tiny_weights, tmp_path, caplog, monkeypatch):
    import numpy as np
    from PIL import Image

    from vocabseg.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    image = tmp_path / "photo.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    code = main(["segment", str(image), "--method", "proxyclip", "--weights", str(tiny_weights), "--device", "cpu",
                 "--classes", "cat", "--no-text-cache", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "Could not get the DINO weights 'dino_vitb8'" in caplog.text and "--model dino=PATH" in caplog.text


def test_a_toy_method_gets_a_timm_dino_through_the_factory_as_its_second_model(clip, tmp_path, monkeypatch):
    """Issue 13 item 9: a method registered here declares a DINO role; the segmenter loads the timm ViT through the
    factory (shared with any other request for it), describes it, and the DINO's tokens shape the result."""
    from dataclasses import dataclass
    from typing import ClassVar

    from vocabseg import Segmenter
    from vocabseg.methods import registry
    from vocabseg.methods.base import CLIP_SLOT, Method, ModelSlot
    from vocabseg.pipeline.preprocess import preprocess
    from vocabseg.pipeline.protocol import Protocol
    from vocabseg.pipeline.windows import grid_logits_to_crop, upsample

    def pooled_features(models, crops):
        """CLIP's patch features averaged over DINO's cosine neighbours (DINO sees the crop at half size: its
        8-pixel patches then fall on CLIP's 16-pixel grid)."""
        encoder, dino = models.clip.image, models.dino
        features = encoder.head(encoder.run_blocks(encoder.embed(crops)))[:, encoder.prefix_tokens:]
        half = F.interpolate(crops, scale_factor=0.5, mode="bilinear", align_corners=False)
        tokens = F.normalize(tokens_of(dino, half)[:, dino.prefix_tokens:], dim=-1)
        affinity = (tokens @ tokens.transpose(1, 2) * 10).softmax(dim=-1)
        return F.normalize(affinity @ features, dim=-1), encoder.grid(*crops.shape[-2:])

    def tokens_of(dino, images):
        return dino.head(dino.run_blocks(dino.embed(images)))

    @dataclass
    class DinoPooled(Method):
        name: ClassVar[str] = "test-dino-pooled"
        models: ClassVar = {"clip": CLIP_SLOT, "dino": ModelSlot("dino", "dino_vitb8", "neighbours to pool over")}
        default_protocol: ClassVar[Protocol] = Protocol(short_side=64, crop=None)

        def text_patch_features(self, models, crops, text):
            return pooled_features(models, crops)

    registry.available()
    monkeypatch.setitem(registry.METHODS, DinoPooled.name, DinoPooled)
    weights = tmp_path / "dino.pth"
    torch.save(official_state(), weights)
    segmenter = Segmenter("test-dino-pooled", models={"clip": clip, "dino": str(weights)}, text_cache=False)
    assert segmenter.models.dino is load_model("dino", str(weights), "cpu")
    assert isinstance(segmenter.models.dino, TimmViT)
    assert segmenter.describe(segmenter.class_spec(["cat"]))["models"]["dino"] == {
        "arch": "DINO ViT-w128-d2/8", "source": str(weights.resolve())}
    image = np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)
    spec = segmenter.class_spec(["cat", "dog", "tree"])
    result = segmenter.results([image], spec)[0]
    text = segmenter.classifier(spec).embeddings
    with torch.no_grad():
        crops = preprocess(torch.from_numpy(image), 64, normalization=clip.image.normalization)
        features, grid = pooled_features(segmenter.models, crops)
        expected = upsample(grid_logits_to_crop(features @ text.T, grid, crops.shape[-2:])[0], (48, 80))
        plain = F.normalize(clip.image.head(clip.image.run_blocks(clip.image.embed(crops)))[:, 1:], dim=-1)
    torch.testing.assert_close(result.logits, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(features, plain, atol=1e-3)  # the DINO changed the features
