"""Prompt templates: each name becomes one prompt per template, and its embedding is the normalised mean of the
normalised prompt embeddings."""

from __future__ import annotations


def _imagenet_templates() -> tuple[str, ...]:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)


#: The 80 OpenAI ImageNet prompt templates (the list SCLIP, NACLIP, ClearCLIP and ITACLIP use).
IMAGENET_TEMPLATES: tuple[str, ...] = _imagenet_templates()
#: MaskCLIP's 85: the 80 ImageNet templates plus five scene templates (its ``prompt_engineering.py``).
MASKCLIP_TEMPLATES: tuple[str, ...] = IMAGENET_TEMPLATES + tuple(
    f"{lead} {{}} in the scene." for lead in ("there is a", "there is the", "this is a", "this is the", "this is one"))
