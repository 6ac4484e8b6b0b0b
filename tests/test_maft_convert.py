"""`vocabseg convert maft-checkpoint` on a file written in the released (detectron2) layout (spec A.2)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_LOADABLE_CFG, make_tiny_clip
from test_maft_train import run_command

from vocabseg.errors import UsageError
from vocabseg.models.checkpoints import read_state_dict
from vocabseg.models.openclip import load_clip


def released_checkpoint(path, base, tuned, with_text=True):
    """detectron2-style dict: IP-CLIP visual keys, frozen CLIP, a void vector, generator keys, iteration."""
    model = {f"IPCLIP.{k[len('visual.'):]}": v for k, v in tuned.state_dict().items() if k.startswith("visual.")}
    if with_text:
        model.update({f"clip_adapter.clip_model.{k}": v for k, v in base.state_dict().items()})
    model["clip_adapter.non_object_embedding"] = torch.randn(1, 32)
    model["backbone.res2.conv.weight"] = torch.randn(4, 4)
    model["sem_seg_head.predictor.query_embed.weight"] = torch.randn(100, 8)
    model["T.conv1.weight"] = torch.randn(2, 2)
    torch.save({"model": model, "iteration": 999}, path)


def test_convert_released_checkpoint(tmp_path):
    base, tuned = make_tiny_clip(0), make_tiny_clip(7)
    source = tmp_path / "MAFT_tiny.pt"
    released_checkpoint(source, base, tuned)
    out = tmp_path / "maft.safetensors"
    assert run_command("convert", "maft-checkpoint", [str(source), str(out)]) == 0
    load_clip(out)  # loads as CLIP weights
    state = read_state_dict(out)
    assert set(state) == set(tuned.state_dict())
    for key, value in tuned.state_dict().items():
        expected = value if key.startswith("visual.") else base.state_dict()[key]
        assert torch.equal(state[key], expected), key
    # the converted model is the fine-tuned visual tower with the frozen text tower
    assert not torch.equal(state["visual.proj"], base.state_dict()["visual.proj"])


def test_convert_without_text_tower_needs_clip(tmp_path, tiny_weights):
    base = make_tiny_clip(1, TINY_LOADABLE_CFG)  # the model saved in the tiny_weights file
    source = tmp_path / "visual_only.pt"
    released_checkpoint(source, base, make_tiny_clip(3, TINY_LOADABLE_CFG), with_text=False)
    with pytest.raises(UsageError, match="--clip"):
        run_command("convert", "maft-checkpoint", [str(source), str(tmp_path / "x.safetensors")])
    assert not (tmp_path / "x.safetensors").exists()
    out = tmp_path / "y.safetensors"
    assert run_command("convert", "maft-checkpoint", [str(source), str(out), "--clip", str(tiny_weights)]) == 0
    load_clip(out)
    assert torch.equal(read_state_dict(out)["text_projection"], base.state_dict()["text_projection"])


def test_convert_rejects_bad_inputs(tmp_path):
    from vocabseg.methods.maft.convert import convert_maft, read_maft_checkpoint

    torch.save({"model": {"backbone.x": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a MAFT checkpoint"):
        convert_maft(read_maft_checkpoint(tmp_path / "other.pt"))

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"model": {"IPCLIP.proj": torch.zeros(1)}, "obj": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refused"):
        read_maft_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="not found"):
        read_maft_checkpoint(tmp_path / "missing.pt")
    base = make_tiny_clip(0).state_dict()
    broken = {f"IPCLIP.{k[7:]}": v for k, v in base.items() if k.startswith("visual.") and "ln_post" not in k}
    broken.update({f"clip_adapter.clip_model.{k}": v for k, v in base.items()})
    with pytest.raises(ValueError, match="missing"):
        convert_maft(broken)
