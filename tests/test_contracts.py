"""Contracts every registered method keeps (issue 13 item 8), parametrised over the registry: every method x every
preset runs end to end on tiny models and returns consistent shapes; every option round-trips through the command
line to its typed value.

The tiny models are the oracle's (CLIP, DINO ViT-B/8 and B/16, OFA) and a random SAM with its mask decoder, each
given to the segmenter by role, as a user passes ``--model ROLE=PATH``.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from oracle import oracle_path, tiny_clip, voc_rgb

from vocabseg import Segmenter
from vocabseg.cli import build_parser
from vocabseg.methods import registry
from vocabseg.text.classes import parse_classes

#: Compositions checked besides the registered names (each plug-in on two bases).
COMPOSITIONS = ("sclip+resclip", "clearclip+resclip", "sclip+floss", "naclip+resclip+floss")


def _methods() -> list[str]:
    return sorted(registry.available())


def _cases() -> list[tuple[str, str | None]]:
    return [(name, preset) for name in _methods()
            for preset in (None, *registry.method_class(name).presets)]


@pytest.fixture(scope="module")
def text_cache(tmp_path_factory) -> str:
    """One text cache for the module: a benchmark's names are encoded once for every method on the tiny CLIP."""
    return str(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def tiny_sam():
    """A random SAM ViT with its prompt encoder and mask decoder (Trident's refinement needs them)."""
    from vocabseg.models.sam import SamConfig, SamModel, build_model, infer_config

    torch.manual_seed(0)
    model = build_model(SamConfig(embed_dim=48, depth=2, num_heads=6, global_attn_indexes=(1,), window_size=7,
                                  img_size=256, out_chans=32))
    return SamModel(model.eval(), infer_config(model.state_dict()))


def _models(name: str, tiny_sam) -> dict:
    """The tiny model of each role ``name`` declares (by weights file, as the command line gives them)."""
    cls = registry.method_class(name)
    patch16 = name.startswith("trident")
    choices = {
        "clip": tiny_clip(),
        "dino": str(oracle_path("cass", "tiny_dino_vit8w128.pt") if name == "cass"
                    else oracle_path("vfm", "tiny_dino_vitb16.pt" if patch16 else "tiny_dino_vitb8.pt")),
        "sam": tiny_sam,
        "ofa": str(oracle_path("ifseg_ofa", "tiny_ifseg_ofa_d64.pt")),
    }
    return {role: choices[role] for role, slot in cls.models.items() if role in choices or slot.default}


def _stand_in_rankings(labels) -> dict:
    """FLOSS rankings in the official layout (the official file is a download); every label ranked."""
    return {"classes": {label: {"entropy_ranking": [
        {"template_id": (7 * c + 3 * i) % 80, "entropy": 0.1 * i, "pixel_percentage": 1.0, "rank": i + 1}
        for i in range(3)]} for c, label in enumerate(labels)}}


@pytest.mark.parametrize(("name", "preset"), _cases(), ids=lambda v: str(v))
def test_every_method_and_preset_runs_end_to_end_with_consistent_shapes(name, preset, text_cache, tiny_sam,
                                                                         one_thread):
    """Each preset's protocol and options, on a short class list (the presets' own class lists are checked
    below: encoding ADE-847's names for every method would take minutes)."""
    image = voc_rgb()[::2, ::2].copy()  # 94 x 125: small, odd-sized
    spec = parse_classes(["cat", "sofa|couch", "plant"])
    options = {"rankings": _stand_in_rankings(spec.labels)} if "floss" in name else {}
    if name == "corrclip":
        options["masks"] = "slic"
    seg = Segmenter(name, models=_models(name, tiny_sam), preset=preset, device="cpu", text_cache=text_cache,
                    **options)
    out = seg.segment(image, spec)
    height, width = image.shape[:2]
    classes = spec.num_classes
    assert out.labels.shape == (height, width)
    assert out.scores.shape == out.logits.shape == (classes, height, width)
    assert np.isfinite(out.scores).all() and np.isfinite(out.logits).all()
    valid = (out.labels < classes) | (out.labels == 255)
    assert valid.all()
    assert set(out.meta["models"]) == set(seg.method.models)
    labels_only = seg.segment(image, spec, maps=False)
    assert labels_only.scores is None and np.array_equal(labels_only.labels, out.labels)


@pytest.mark.parametrize(("name", "preset"), [case for case in _cases() if case[1]], ids=lambda v: str(v))
def test_every_preset_names_its_classes(name, preset):
    """A preset's benchmark and name list resolve to one query-name tuple per class."""
    spec = registry.method_class(name).presets[preset].class_spec()
    assert spec.num_classes == len(spec.names) and all(spec.names)
    assert len(set(spec.labels)) == spec.num_classes


def _cli_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _other_value(annotation, value):
    """A value of the option's type other than ``value`` (None when there is no obvious one)."""
    if isinstance(value, bool):
        return not value
    if typing.get_origin(annotation) is typing.Literal:
        others = [choice for choice in typing.get_args(annotation) if choice != value]
        return others[0] if others else None
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.5
    return None


def _round_trip(name: str, options: dict) -> dict:
    """Options written as ``--option KEY=VALUE`` text, parsed by the CLI and converted by the registry."""
    argv = ["segment", "x.png", "--classes", "cat", "--out", "out", "--method", name]
    for key, value in options.items():
        argv += ["--option", f"{key}={_cli_text(value)}"]
    args = build_parser().parse_args(argv)
    return registry.create(name, **dict(args.option)).options()


@pytest.mark.parametrize("name", [*_methods(), *COMPOSITIONS])
def test_every_option_round_trips_through_the_command_line(name):
    cls = registry.method_class(name)
    defaults = registry.create(name).options()
    hints = typing.get_type_hints(cls)
    plain = {key: value for key, value in defaults.items()
             if value is None or isinstance(value, (bool, int, float, str, tuple, Path))}
    assert _round_trip(name, plain) == defaults
    changed = {key: other for key, value in plain.items()
               if (other := _other_value(hints.get(key), value)) is not None}
    if not changed:
        return
    try:
        parsed = _round_trip(name, changed)
    except ValueError as error:  # a changed value the method refuses (a range check) is a usage error, not a crash
        assert type(error).__name__ == "UsageError", error
        return
    for key, value in changed.items():
        assert parsed[key] == value, key


def test_a_wrong_option_type_is_a_usage_error_naming_the_option():
    from vocabseg.errors import UsageError

    with pytest.raises(UsageError, match="gaussian_std"):
        _round_trip("naclip", {"gaussian_std": "abc"})


def test_the_registry_lists_every_method_package():
    methods = set(_methods())
    assert {"clip", "maskclip", "sclip", "clearclip", "naclip", "itaclip", "cliptrase", "scclip", "sfp", "pearl",
            "resclip", "floss", "proxyclip", "corrclip", "cass", "trident", "ifseg", "ifseg-clip"} <= methods
    for name in methods:
        cls = registry.method_class(name)
        assert cls.models and dataclasses.is_dataclass(cls), name


def test_a_model_role_given_as_an_option_says_how_to_pass_it():
    from vocabseg.errors import UsageError

    with pytest.raises(UsageError, match=r"dino is a model of proxyclip, not an option: pass --model dino="):
        Segmenter("proxyclip", dino="dino_vitb8")  # refused before any model loads (none could, offline)
