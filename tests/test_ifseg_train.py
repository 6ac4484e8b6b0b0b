"""The CLIP-based IFSeg head: starts at the training-free baseline, training lowers the loss, checkpoints
round-trip and resume continues exactly; the CLI trains without images and segments with the checkpoint."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vocabseg import Segmenter
from vocabseg.cli import main
from vocabseg.methods.ifseg import train as train_module
from vocabseg.methods.ifseg.commands import CLIP_PROTOCOL_NAMES, OFA_PROTOCOL_NAMES
from vocabseg.methods.ifseg.protocols import OFA_PROTOCOLS, PROTOCOLS
from vocabseg.methods.ifseg.sampler import WordSet
from vocabseg.methods.ifseg.train import TextTargets, TrainConfig, new_head, train
from vocabseg.models.ifseg_head import (
    HeadConfig,
    IFSegHead,
    check_feature_width,
    load_head_checkpoint,
    load_ifseg_head,
)
from vocabseg.models.ofa.weights import DEFAULT_OFA_WEIGHTS

E = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def _targets(classes=5, seed=0):
    text = F.normalize(torch.randn(classes, E, generator=torch.Generator().manual_seed(seed)), dim=-1)
    names = [[f"c{i}"] for i in range(classes)]
    return TextTargets(tuple(n[0] for n in names), WordSet.build(names), text, text, torch.arange(classes))


def _config(**changes):
    base = dict(iterations=6, batch_size=4, lr=3e-3, noise_var=0.2, max_cells=8, grid=(8, 8), save_every=3)
    return TrainConfig(**{**base, **changes})


def _head(seed=0):
    return new_head(HeadConfig(E, width=32, layers=1, heads=2, base_grid=(8, 8)), seed)


def test_untrained_head_is_the_identity():
    head = IFSegHead(HeadConfig(E, width=32, layers=1, heads=2)).eval()
    features = F.normalize(torch.randn(2, 30, E), dim=-1)
    assert torch.equal(head(features, (5, 6)), features)


def test_untrained_ifseg_equals_its_training_free_recipe(clip, chelsea):
    knobs = dict(short_side=64, crop=48, stride=16, logit_scale=50.0, text_cache=False)
    classes = dict(classes=["cat", "grass|lawn"], background=False)
    base = Segmenter("clearclip", models={"clip": clip}, **knobs).segment(chelsea, **classes)
    ours = Segmenter("ifseg-clip", models={"clip": clip}, knn=False, **knobs).segment(chelsea, **classes)
    assert np.array_equal(ours.logits, base.logits)
    assert np.array_equal(ours.labels, base.labels)
    smoothed = Segmenter("ifseg-clip", models={"clip": clip}, **knobs)
    assert not np.allclose(smoothed.segment(chelsea, **classes).scores, base.scores)  # kNN is on by default
    assert smoothed.describe(smoothed.class_spec(**classes))["models"]["ifseg_head"]["source"] == "untrained"


def test_the_trained_models_are_model_slots():
    """Both IFSeg models are declared models (in describe() and fingerprints), and the protocol names the command
    line offers without importing them are the package's."""
    from vocabseg.methods.registry import method_class

    assert method_class("ifseg").models["ofa"].default == DEFAULT_OFA_WEIGHTS
    assert method_class("ifseg-clip").models["ifseg_head"].kind == "ifseg_head"
    assert tuple(sorted(PROTOCOLS)) == CLIP_PROTOCOL_NAMES
    assert tuple(sorted(OFA_PROTOCOLS)) == OFA_PROTOCOL_NAMES


def test_training_lowers_the_loss(tmp_path):
    losses = train(_head(), _targets(), _config(iterations=100, save_every=1000), tmp_path / "h.pt", progress=False)
    assert np.mean(losses[-10:]) < 0.75 * np.mean(losses[:10]), (losses[:10], losses[-10:])


def test_save_load_and_exact_resume(tmp_path, monkeypatch):
    targets, config = _targets(), _config()
    full = _head()
    full_losses = train(full, targets, config, tmp_path / "full.pt", progress=False)

    calls = {"n": 0}
    real_batch = train_module.artificial_batch

    def interrupted(*args):
        calls["n"] += 1
        if calls["n"] == 5:  # dies during step 5, after the checkpoint of step 3
            raise KeyboardInterrupt
        return real_batch(*args)

    monkeypatch.setattr(train_module, "artificial_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(_head(), targets, config, tmp_path / "run.pt", progress=False)
    monkeypatch.setattr(train_module, "artificial_batch", real_batch)
    state = load_head_checkpoint(tmp_path / "run.pt")
    assert state["step"] == 3 and len(state["losses"]) == 3
    resumed = _head()
    resumed_losses = train(resumed, targets, config, tmp_path / "run.pt", resume=state, progress=False)
    assert resumed_losses == full_losses
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    model = load_ifseg_head(tmp_path / "full.pt")
    loaded, saved = model.head, model.checkpoint
    assert saved["step"] == 6 and saved["classes"] == list(targets.labels)
    x = F.normalize(torch.randn(1, 64, E), dim=-1)
    with torch.no_grad():
        assert torch.equal(loaded(x, (8, 8)), full(x, (8, 8)))
        assert not torch.equal(loaded(x, (8, 8)), x)  # training moved it away from the identity
    check_feature_width(model, E)
    with pytest.raises(ValueError, match="16-d CLIP features"):
        check_feature_width(model, 32)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_head_checkpoint(tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save({"state": 1}, other)
    with pytest.raises(ValueError, match="not an IFSeg checkpoint"):
        load_head_checkpoint(other)


def test_protocols():
    unseen = PROTOCOLS["coco-stuff-unseen15"]
    table = unseen.label_lookup()
    assert len(unseen.train_classes) == 15 and unseen.eval_classes == unseen.train_classes
    assert table[unseen.gt_to_eval.index(0)] == 0 and (table[:171] != 255).sum() == 15 and table[255] == 255
    coarse = PROTOCOLS["coco-stuff27"]
    assert coarse.hierarchy == "coco-stuff" and len(coarse.eval_classes) == 27
    assert coarse.eval_classes[coarse.label_lookup()[0]] == "person"  # fine id 0 is person
    cross = PROTOCOLS["coco-to-ade150"]
    assert len(cross.train_classes) == 171 and len(cross.eval_classes) == 150 and cross.eval_dataset == "ade150"
    assert unseen.classes_file().splitlines() == list(unseen.train_classes)


def test_cli_trains_without_images_and_segments(tmp_path, tiny_weights, chelsea):
    from PIL import Image

    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog, puppy\nsky\n")
    hierarchy = tmp_path / "h.txt"
    hierarchy.write_text("sky: clouds\n")
    ckpt = tmp_path / "ifseg.pt"
    args = ["train", "ifseg-clip", "--classes-file", str(classes), "--hierarchy", str(hierarchy), "--weights",
            str(tiny_weights), "--out", str(ckpt), "--iterations", "4", "--batch-size", "2", "--grid", "4",
            "--width", "32", "--heads", "2", "--layers", "1", "--save-every", "2"]
    assert main(args) == 0
    state = load_head_checkpoint(ckpt)
    assert state["step"] == 4 and state["words"] == ["cat", "dog", "puppy", "sky", "clouds"]
    assert state["head_config"]["embed_dim"] == 32 and state["head_config"]["recipe"] == "clearclip"
    assert main(args) == 2  # refuses to overwrite
    assert main([*args, "--resume"]) == 0  # a finished run resumes to nothing
    assert main([*args[:-2], "--save-every", "3", "--resume"]) == 2  # other options: not the same run
    image = tmp_path / "cat.png"
    Image.fromarray(chelsea[::4, ::4]).save(image)
    out = tmp_path / "seg"
    assert main(["segment", str(image), "--classes", "cat,dog", "--weights", str(tiny_weights), "--method",
                 "ifseg-clip", "--checkpoint", str(ckpt), "--short-side", "64", "--crop", "none",
                 "--out", str(out)]) == 0
    assert (out / "cat.png").exists() and (out / "cat.json").exists()
    assert main(["segment", str(image), "--classes", "cat,dog", "--weights", str(tiny_weights), "--method",
                 "ifseg-clip", "--model", f"ifseg_head={ckpt}", "--short-side", "64", "--crop", "none",
                 "--out", str(tmp_path / "seg2")]) == 0
    assert json.loads((out / "cat.json").read_text())["models"]["ifseg_head"]["source"] == str(ckpt.resolve())
    assert main(["segment", str(image), "--classes", "cat", "--weights", str(tiny_weights), "--method", "ifseg-clip",
                 "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(out)]) == 2
