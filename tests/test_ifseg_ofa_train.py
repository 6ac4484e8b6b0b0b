"""IFSeg's image-free training on OFA: the official training step (artificial map, loss, gradients) reproduced from
the same seeds, the freeze policy, resumable checkpoints and ``vocabseg train ifseg`` on a tiny model."""

import functools
import json

import numpy as np
import pytest
import torch
from oracle import golden, golden_meta, oracle_path

from vocabseg.methods.ifseg.ofa_train import ImageFreeTask, artificial_sample, freeze, imagefree_loss
from vocabseg.models.ofa import OFATokenizer, load_ofa

VOC5 = ["person", "bus", "dining table", "potted plant", "tv monitor"]

pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def _tokenizer() -> OFATokenizer:
    return OFATokenizer.from_folder(oracle_path("ifseg_ofa", "bpe"))


def _train_golden() -> dict[str, torch.Tensor]:
    return {k[len("train/"):]: v for k, v in golden("ifseg_ofa", "golden_train.pt").items()}


@functools.cache
def _official_step():
    """One step as the oracle ran it (dropout and drop path off), with our code."""
    model = load_ofa(oracle_path("ifseg_ofa", "tiny_ifseg_ofa_d64.pt"), dropout=0.0, encoder_drop_path=0.0,
                     decoder_drop_path=0.0).model
    task = ImageFreeTask.build(_tokenizer(), VOC5, [(w,) for w in VOC5])
    cells, word_map, target = artificial_sample(task.words, torch.Generator().manual_seed(3), np.random.RandomState(3),
                                                (32, 32), (512, 512))
    trained = freeze(model)
    model.train()
    recorded = {}
    hooks = [model.encoder.patch_layernorm_embedding.register_forward_hook(
                 lambda m, a, out: recorded.__setitem__("image_tokens", out)),
             model.decoder.register_forward_hook(lambda m, a, out: recorded.__setitem__("dec_out", out))]
    words, classes = task.embeddings(model)
    loss, logits = imagefree_loss(model, task.prompt_tokens, words, classes, word_map[None], target[None])
    loss.backward()
    for hook in hooks:
        hook.remove()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return dict(model=model, task=task, cells=cells, word_map=word_map, target=target, trained=trained, loss=loss,
                logits=logits[0], recorded=recorded, grads=grads)


def test_artificial_map_from_the_official_seeds():
    gold, step = _train_golden(), _official_step()
    assert torch.equal(step["cells"], gold["grid_UxV"].long())
    assert torch.equal(step["word_map"], gold["token_class_map_32x32"].long())  # one word per class: ids agree
    assert torch.equal(step["target"], gold["target_class_map_512x512"].long())
    assert step["task"].prompt_tokens.tolist() == gold["aux_src_tokens"].tolist()


def test_official_training_step_loss_and_activations():
    gold, step = _train_golden(), _official_step()
    torch.testing.assert_close(step["recorded"]["image_tokens"][0, :1024], gold["enc_image_tokens"], rtol=1e-4,
                               atol=1e-4)
    torch.testing.assert_close(step["recorded"]["dec_out"][0].detach(), gold["dec_out"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step["logits"].detach(), gold["seg_logits"], rtol=0, atol=1e-4)
    loss = float(step["loss"].detach())
    print(f"loss {loss:.7f} (official {float(gold['loss']):.7f})")
    assert abs(loss - float(gold["loss"])) <= 1e-6 * float(gold["loss"]) + 1e-7


def test_official_training_step_gradients():
    gold, step = _train_golden(), _official_step()
    grads = step["grads"]
    official_norms = golden_meta("ifseg_ofa", "golden_train.pt")["info"]["grad_norms"]
    assert set(grads) == set(official_norms), "trained parameters differ from the official freeze policy"
    assert {n for n, g in grads.items() if g is None} == {n for n, v in official_norms.items() if v is None}
    worst = 0.0
    for name, norm in official_norms.items():
        if norm is not None:
            ours = float(grads[name].norm())
            worst = max(worst, abs(ours - norm) / max(norm, 1e-3))
            assert abs(ours - norm) <= 1e-3 * norm + 1e-6, (name, ours, norm)
    total = float(torch.stack([g.norm() for g in grads.values() if g is not None]).norm())
    official_total = float(gold["total_grad_norm"])
    print(f"total gradient norm {total:.6f} (official {official_total:.6f}); worst relative per-tensor "
          f"difference {worst:.2e}")
    assert abs(total - official_total) <= 1e-4 * official_total
    for key, value in gold.items():
        if key.startswith("grad/"):
            torch.testing.assert_close(grads[key[len("grad/"):]], value, rtol=1e-3, atol=1e-6, msg=key)


def test_freeze_policy_matches_the_official_trainable_set():
    config = json.loads(oracle_path("ifseg_ofa", "tiny_ifseg_ofa_config.json").read_text())
    step = _official_step()
    ours = [name for name, p in step["model"].named_parameters() if p.requires_grad]
    assert sorted(ours) == sorted(config["trainable_parameters"])


def _train_args(classes, out, *extra):
    return ["train", "ifseg", "--classes-file", str(classes), "--weights",
            str(oracle_path("ifseg_ofa", "tiny_ifseg_ofa_d64.pt")), "--out", str(out), "--iterations", "2",
            "--batch-size", "1", "--target-size", "64", "--save-every", "1", "--device", "cpu", *extra]


def test_train_cli_resumes_exactly_and_segments_with_the_checkpoint(tmp_path, monkeypatch):
    from vocabseg import Segmenter
    from vocabseg.cli import main
    from vocabseg.methods.ifseg import ofa_train
    from vocabseg.methods.ifseg.ofa_train import load_ofa_checkpoint

    classes = tmp_path / "classes.txt"
    classes.write_text("person\nbus, coach\ndining table\n")
    whole = tmp_path / "whole.pt"
    assert main(_train_args(classes, whole)) == 0

    interrupted = tmp_path / "interrupted.pt"
    save = ofa_train.save_ofa_checkpoint

    def save_then_stop(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(ofa_train, "save_ofa_checkpoint", save_then_stop)
    assert main(_train_args(classes, interrupted)) == 130
    assert load_ofa_checkpoint(interrupted)["step"] == 1
    monkeypatch.setattr(ofa_train, "save_ofa_checkpoint", save)
    assert main(_train_args(classes, interrupted)) == 2  # exists: --resume is required
    assert main(_train_args(classes, interrupted, "--resume")) == 0

    a, b = load_ofa_checkpoint(whole), load_ofa_checkpoint(interrupted)
    assert a["step"] == b["step"] == 2 and a["losses"] == b["losses"]
    assert a["words"] == ["person", "bus", "dining table"] and "coach" in a["map_words"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    untrained = load_ofa(oracle_path("ifseg_ofa", "tiny_ifseg_ofa_d64.pt")).model.state_dict()
    changed = [k for k in a["model"] if not torch.equal(a["model"][k], untrained[k])]
    assert changed and not any(k.startswith(("encoder.embed_images.", "encoder.image_proj.", "encoder.embed_tokens."))
                               for k in changed)

    segmenter = Segmenter("ifseg", models={"ofa": str(whole)}, device="cpu")
    with pytest.warns(DeprecationWarning, match="checkpoint= is deprecated"):
        old_name = Segmenter("ifseg", checkpoint=str(whole), device="cpu")
    assert old_name.models.ofa is segmenter.models.ofa  # the same model, loaded once
    reversed_spec = segmenter.class_spec(["dining table", "bus", "person"], background=False)
    classifier = segmenter.classifier(reversed_spec)
    trained_order = segmenter.classifier(segmenter.class_spec(["person", "bus", "dining table"], background=False))
    assert torch.equal(classifier.prompt, trained_order.prompt)  # the checkpoint's order, whatever the given one
    image = np.zeros((40, 56, 3), dtype=np.uint8)
    image[:, 28:] = 200
    result = segmenter.segment(image, reversed_spec)
    assert result.labels.shape == (40, 56) and result.meta["method"] == "ifseg"
