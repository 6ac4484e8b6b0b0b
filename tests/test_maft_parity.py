"""MAFT against its official code (``../shared/oracle/maft_train``, README there): one training step and the
inference ensemble, through vocabseg's own code paths.

Training: the trainer's sample preparation (the mapper without augmentation: grey padding, GT instances, the 480
resize), its class probabilities, losses, freeze policy, gradients and optimiser step, for the genuine first
iteration (``step0``) and a state whose student differs from the teacher (``perturbed``). The proposal
generator is bypassed as in the oracle: its stored mask logits replace the trainer's proposals. Inference: the
``maft`` method on the VOC photo with the stored generator outputs in a proposal file, for the four ensemble
settings. Run with ``-s`` to print the measured differences.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from oracle import assert_close_logits, assert_labels_agree, golden, golden_meta, oracle_path, tiny_clip_weights
from PIL import Image

from vocabseg.methods.maft.losses import minmax_norm, soft_iou
from vocabseg.methods.maft.proposals import masks_from_logits, read_proposal_file
from vocabseg.methods.maft.train import Trainer, make_sample
from vocabseg.methods.maft.train_config import TrainConfig
from vocabseg.models.encoder import CLIP
from vocabseg.models.openclip import load_clip

TRAIN = ("maft_train", "golden_maft_train.pt")
INFER = ("maft_train", "golden_maft_infer_voc.pt")
IMAGES = ("astronaut", "voc")
STATES = ("step0", "perturbed")
#: The oracle's training configuration: the released recipe, a batch of the two images, no augmentation, padding
#: to 256 (the mapper's size divisibility there).
CONFIG = TrainConfig(batch_size=2, micro_batch=2, crop_size=256, augment=False)


def tiny_clip() -> CLIP:
    """A fresh copy of the oracle's tiny CLIP (not the factory's shared one: the trainer changes it in place)."""
    return load_clip(str(tiny_clip_weights()), None, "cpu")


def ours(name: str) -> str:
    """The official parameter name ``IPCLIP.<x>`` as vocabseg's CLIP names it (``visual.<x>``)."""
    return "visual." + name.removeprefix("IPCLIP.")


@pytest.fixture(scope="module")
def single_thread():
    """The goldens were computed with one thread (step0's distillation loss is exactly 0 only then)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def training_items(g) -> list[tuple[np.ndarray, np.ndarray]]:
    """The two photos and their ground-truth PNGs as the official mapper read them (before its padding)."""
    items = []
    for b, name in enumerate(IMAGES):
        with Image.open(oracle_path("maft_train", f"gt_{name}.png")) as png:
            labels = np.asarray(png).astype(np.int64)
        height, width = labels.shape
        items.append((g["train/image"][b, :, :height, :width].permute(1, 2, 0).numpy(), labels))
    return items


def relative_error(ours_: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours_ - theirs).abs().max() / theirs.abs().max())


# --- training ---------------------------------------------------------------------------------------------------

def test_training_samples_match_the_official_mapper():
    g = golden(*TRAIN)
    for b, item in enumerate(training_items(g)):
        sample = make_sample(item, np.random.default_rng(0), CONFIG)
        assert_close_logits(sample.image[None, :, 8::16, 8::16], g["train/clip_input_480_probe"][b:b + 1], 1e-5,
                            f"{IMAGES[b]} IP-CLIP input (every 16th pixel of 480x480)")
        assert torch.equal(sample.gt_labels, g[f"train/gt_classes_{b}"])
        assert torch.equal(sample.gt_masks.bool(), torch.stack([g["train/sem_seg"][b] == c
                                                                for c in sample.gt_labels]))
    assert torch.equal(torch.cat([torch.full((5,), b) for b in range(2)]), g["train/inst_image"])


def test_proposal_masks_from_generator_logits():
    g = golden(*TRAIN)
    masks = masks_from_logits(g["train/proposal_logits"].flatten(0, 1).float(), (256, 256))
    assert_close_logits(masks.view(2, 100, 256, 256)[..., 8::16, 8::16], g["train/proposal_probs_probe"], 1e-6,
                        "sigmoid masks (every 16th pixel)")


@pytest.fixture(scope="module", params=STATES)
def step(request, single_thread, tmp_path_factory):
    """One official training step with vocabseg's trainer: every quantity the golden stores, as ours."""
    state = request.param
    g = golden(*TRAIN)
    names = golden_meta(*TRAIN)["class_names"]
    items = training_items(g)
    trainer = Trainer(tiny_clip(), items, names, CONFIG, tmp_path_factory.mktemp("maft"))
    params = dict(trainer.model.named_parameters())
    if state == "perturbed":
        with torch.no_grad():
            for part in ("weight", "bias"):
                params[f"visual.ln_post.{part}"].copy_(g[f"train/perturbed/student_override/IPCLIP.ln_post.{part}"])
    samples = [dataclasses.replace(make_sample(item, np.random.default_rng(0), CONFIG),
                                   proposals=masks_from_logits(g["train/proposal_logits"][b].float(), (256, 256)))
               for b, item in enumerate(items)]
    images = torch.stack([s.image for s in samples])
    out = {"trainer": trainer, "text": trainer.text}
    with torch.no_grad():
        embeddings = trainer.student.encode(images, torch.stack([s.proposals for s in samples]))
        probs = trainer.class_probs(embeddings)
        out["proposal_embeddings"] = embeddings
        out["clip_logits"] = trainer.cfg.temperature * embeddings @ trainer.text.T
        out["pred_scores"] = torch.cat([probs[b][:, s.gt_labels].T for b, s in enumerate(samples)])
        iou = [soft_iou(s.proposals, s.gt_masks) for s in samples]
        out["iou"] = torch.cat([x.T for x in iou])
        out["iou_norm"] = torch.cat([minmax_norm(x, dim=0).T for x in iou])
        for role, encoder in (("student", trainer.student), ("teacher", trainer.frozen)):
            out[f"{role}_embedding"] = encoder.encode(images)
            out[f"{role}_logits"] = trainer.cfg.temperature * out[f"{role}_embedding"] @ trainer.text.T
            out[f"{role}_probs"] = trainer.class_probs(out[f"{role}_embedding"])
    trainer.optimizer.zero_grad(set_to_none=True)
    loss, out["loss_ma"], out["loss_dis_unweighted"] = trainer.micro_loss(samples)
    loss.backward()
    out["loss_total"] = float(loss.detach())
    out["grad"] = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    before = {n: params[n].detach().clone() for n in trainer.names}
    out["clip_total_norm"] = trainer.step(0)
    out["after_step"] = {n: params[n].detach().clone() for n in trainer.names}
    out["update"] = {n: out["after_step"][n] - before[n] for n in trainer.names}
    return state, out


def test_text_classifier_is_the_official_one(step):
    _, out = step
    assert_close_logits(out["text"], golden(*TRAIN)["train/text_features"][:8], 1e-5, "text classifier (8 classes)")


def test_forward_quantities(step):
    state, out = step
    g = golden(*TRAIN)
    official = torch.nn.functional.normalize(g[f"train/{state}/proposal_embeddings"], dim=-1)
    assert_close_logits(out["proposal_embeddings"], official, 1e-4, f"{state} proposal embeddings (L2-normalised)")
    assert_close_logits(out["clip_logits"], g[f"train/{state}/clip_logits"][..., :8], 1e-3,
                        f"{state} IP-CLIP logits (100 cos)")
    for role in ("student", "teacher"):
        official = torch.nn.functional.normalize(g[f"train/{state}/{role}_embedding"], dim=-1)
        assert_close_logits(out[f"{role}_embedding"], official, 1e-4, f"{state} {role} embedding")
        assert_close_logits(out[f"{role}_logits"], g[f"train/{state}/{role}_logits"][..., :8], 1e-3,
                            f"{state} {role} logits")
        assert_close_logits(out[f"{role}_probs"], g[f"train/{state}/{role}_probs"], 1e-4, f"{state} {role} probs")
    assert_close_logits(out["iou"], g[f"train/{state}/iou"], 1e-4, f"{state} soft IoU")
    assert_close_logits(out["iou_norm"], g[f"train/{state}/iou_norm"], 1e-4, f"{state} min-max IoU targets")
    assert_close_logits(out["pred_scores"], g[f"train/{state}/pred_scores"], 1e-4, f"{state} class probabilities")


def test_losses(step):
    state, out = step
    g = golden(*TRAIN)
    for key in ("loss_ma", "loss_total"):
        error = abs(out[key] - float(g[f"train/{state}/{key}"])) / float(g[f"train/{state}/{key}"])
        print(f"{state} {key}: {out[key]:.9g} (official {float(g[f'train/{state}/{key}']):.9g}), rel {error:.1e}")
        assert error <= 1e-4
    dis, official = out["loss_dis_unweighted"], float(g[f"train/{state}/loss_dis_unweighted"])
    print(f"{state} loss_dis (unweighted): {dis:.9g} (official {official:.9g})")
    if state == "step0":
        assert official == 0 and abs(dis) < 1e-10
    else:
        assert abs(dis - official) <= 1e-4 * official
        weighted = out["loss_total"] - out["loss_ma"]
        assert weighted == pytest.approx(float(g["train/perturbed/loss_dis"]), rel=1e-4)  # x dis_weight 0.1


def test_freeze_policy_and_optimiser_groups(step):
    _, out = step
    trainer = out["trainer"]
    policy = json.loads(oracle_path("maft_train", "trainable_params.json").read_text())
    official = {ours(n): v for n, v in policy["trainable"].items()}
    assert set(trainer.names) == set(official) and len(official) == policy["count_tensors"] == 98
    params = dict(trainer.model.named_parameters())
    assert sum(params[n].numel() for n in trainer.names) == policy["count_params"] == 798_976
    assert sum(p.numel() for n, p in params.items() if n.startswith("visual.")) == policy["n_params_IPCLIP"]
    group_of = {id(p): group for group in trainer.optimizer.param_groups for p in group["params"]}
    for name, spec in official.items():
        group = group_of[id(params[name])]
        assert (list(params[name].shape), group["lr"], group["weight_decay"]) == (spec["shape"], spec["lr"],
                                                                                  spec["weight_decay"]), name
        assert (group["betas"], group["eps"]) == ((0.9, 0.999), 1e-8)
    assert not any(params[ours(n)].requires_grad for n in policy["frozen_IPCLIP"])
    assert not any(p.requires_grad for p in trainer.teacher.text.model.parameters())
    assert set(out["grad"]) == set(official)  # gradients reach exactly the trainable tensors ...
    assert all(out["grad"][n].abs().max() > 0 for n in official)  # ... and every one of them


def test_gradients(step):
    state, out = step
    g = golden(*TRAIN)
    names = json.loads(oracle_path("maft_train", "trainable_params.json").read_text())["trainable"]
    norms = torch.stack([out["grad"][ours(n)].norm() for n in names])
    worst = float(((norms - g[f"train/{state}/grad_norms"]).abs() / g[f"train/{state}/grad_norms"]).max())
    print(f"{state} gradient norms of the 98 tensors: worst relative difference {worst:.1e}")
    assert worst <= 1e-3
    total = float(g[f"train/{state}/total_grad_norm"])
    print(f"{state} global gradient norm {out['clip_total_norm']:.9g} (official {total:.9g})")
    assert out["clip_total_norm"] == pytest.approx(total, rel=1e-4)
    assert out["clip_total_norm"] == pytest.approx(float(g[f"train/{state}/clip_total_norm"]), rel=1e-4)
    for name in golden_meta(*TRAIN)["grad_tensors"]:
        theirs = g[f"train/{state}/grad/{name}"]
        error = relative_error(out["grad"][ours(name)], theirs)
        print(f"{state} gradient {name}: max |diff| {(out['grad'][ours(name)] - theirs).abs().max():.1e} "
              f"= {error:.1e} of its largest entry")
        assert error <= 1e-4


def test_optimiser_step(step):
    state, out = step
    g = golden(*TRAIN)
    for name in golden_meta(*TRAIN)["grad_tensors"]:
        assert_close_logits(out["after_step"][ours(name)], g[f"train/{state}/after_step/{name}"], 1e-7,
                            f"{state} after the step: {name}")
    names = json.loads(oracle_path("maft_train", "trainable_params.json").read_text())["trainable"]
    norms = torch.stack([out["update"][ours(n)].norm() for n in names])
    worst = float(((norms - g[f"train/{state}/update_norms"]).abs() / g[f"train/{state}/update_norms"]).max())
    print(f"{state} update norms of the 98 tensors: worst relative difference {worst:.1e}")
    assert worst <= 1e-3


# --- inference ensemble -----------------------------------------------------------------------------------------

#: The four official settings as ``maft`` options (``lam08_flag`` adds the seen classes of its dataset's flags).
SETTINGS = {
    "lam0": dict(ensemble=0.0),
    "lam08": dict(ensemble=0.8),
    "lam08_flag": dict(ensemble=0.8),
    "generator_only": dict(clip_ensemble=False),
}


@pytest.fixture(scope="module")
def generator_file(tmp_path_factory):
    """The bypassed generator's outputs for the VOC photo as a proposal file (raw Mask2Former outputs)."""
    g = golden(*INFER)
    path = tmp_path_factory.mktemp("maft") / "voc.npz"
    np.savez(path, mask_logits=g["infer/voc/proposal_logits"].float().numpy(),
             class_logits=g["infer/voc/generator_logits"].numpy())
    return path


@pytest.fixture(scope="module")
def infer_clip(single_thread):
    return tiny_clip()


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_inference_ensemble(setting, generator_file, infer_clip):
    from vocabseg import Segmenter

    g = golden(*INFER)
    meta = golden_meta(*INFER)
    names = meta["class_names"]
    flags = meta["info"]["voc"]["variants"][setting]["trainable_flag"] or [0] * len(names)
    seen = ",".join(name for name, flag in zip(names, flags, strict=True) if flag)
    image = g["infer/voc/image"].permute(1, 2, 0).numpy()
    seg = Segmenter("maft", models={"clip": infer_clip}, text_cache=False, proposals="file",
                    proposal_file=str(generator_file), fill="none", seen=seen, **SETTINGS[setting])
    assert (seg.method.size_divisibility, seg.method.input_size, seg.method.keep_small) == (32, 480, False)
    out = seg.segment(image, names, background=False)
    assert_labels_agree(out.labels, g[f"infer/voc/{setting}/pred"], 0.995, f"{setting} labels")
    if setting == "lam0":
        assert_close_logits(out.scores, g["infer/voc/lam0/sem_seg"], 1e-4, "lam0 sem_seg")

    # the per-proposal scores the method weights the masks with
    proposals = read_proposal_file(generator_file, image.shape[:2], meta["info"]["voc"]["padded_hw"])
    classifier = seg.classifier(seg.class_spec(names, background=False))
    cosine, clip_probs = seg.method.proposal_scores(seg.models, torch.from_numpy(image), proposals.padded,
                                                    classifier)
    assert_close_logits(100 * cosine, g["infer/voc/clip_logits"][:, :8], 1e-3, f"{setting} IP-CLIP logits")
    assert torch.equal((proposals.masks > 0.5).flatten(1).any(1), g["infer/voc/valid_flag"])
    scores = seg.method.class_scores(clip_probs, proposals, names)
    assert_close_logits(scores, g[f"infer/voc/{setting}/scores"], 1e-5, f"{setting} per-proposal scores A")
