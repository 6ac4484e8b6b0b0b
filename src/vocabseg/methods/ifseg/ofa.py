"""IFSeg on OFA, as the paper and its official code build it: prompt, category embeddings, one segmentation pass,
kNN smoothing and label maps at the original size. Plain functions over tensors.

* Prompt (encoder text): ``<s> what is the segmentation map of the image? object: w_1 ... w_C unknown </s>``; every
  whitespace-separated word is BPE-encoded as ``' ' + word``; ``unknown`` (the ignore label ``C``) has no embedding.
* Category embeddings: the mean of each word's BPE token embeddings (the official ``EmbeddingBag``); the logits are
  ``<h_p, e_c>`` over the ``C`` categories only, no temperature.
* Eval preprocessing (mmseg ``MultiScaleFlipAug`` 2048x512): mmcv rescale (short side 512, long side at most 2048,
  OpenCV bilinear on the 8-bit image), then ``(x / 255 - 0.5) / 0.5``.
* kNN smoothing (``resnet_topk`` 3, ``resnet_iters`` 25): softmax over the categories, then each token's
  probabilities are replaced 25 times by the mean over its 3 nearest tokens by cosine of the ResNet layer3
  features (``torch.topk``: a token is not always among its own neighbours when feature rows are duplicated).
* Label map: logits or smoothed probabilities upsampled bilinearly from the token grid straight to the original
  image size (align_corners=False), argmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vocabseg.errors import UsageError
from vocabseg.methods.ifseg.knn import DEFAULT_ITERS, DEFAULT_K, knn_smooth
from vocabseg.models.ofa.bpe import BOS, EOS, OFATokenizer
from vocabseg.pipeline.preprocess import resize_uint8, resized_shape

PROMPT_PREFIX = "what is the segmentation map of the image? object:"
UNKNOWN_WORD = "unknown"
SHORT_SIDE = 512
LONG_SIDE = 2048


@dataclass(frozen=True)
class CategoryPrompt:
    """The encoder text ``L`` of a category list and each category's BPE token ids."""

    words: tuple[str, ...]
    tokens: torch.Tensor
    word_tokens: tuple[torch.Tensor, ...]


def word_token_ids(tokenizer: OFATokenizer, words: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """Each word's BPE token ids (``' ' + w`` for each of its whitespace-separated parts)."""
    word_tokens = tuple(torch.tensor(tokenizer.encode_words(word), dtype=torch.long) for word in words)
    empty = [w for w, t in zip(words, word_tokens, strict=True) if not len(t)]
    if empty:
        raise UsageError(f"category words without any text: {empty!r}")
    return word_tokens


def category_prompt(tokenizer: OFATokenizer, words: Sequence[str]) -> CategoryPrompt:
    """The official prompt and per-word token ids of ``words`` (in this order)."""
    word_tokens = word_token_ids(tokenizer, words)
    text = [BOS, *tokenizer.encode_words(PROMPT_PREFIX), *torch.cat(word_tokens).tolist(),
            *tokenizer.encode_words(UNKNOWN_WORD), EOS]
    return CategoryPrompt(tuple(words), torch.tensor(text, dtype=torch.long), word_tokens)


def preprocess(image: torch.Tensor, short_side: int = SHORT_SIDE, long_side: int = LONG_SIDE) -> torch.Tensor:
    """uint8 ``H,W,3`` RGB -> ``1,3,h,w`` in ``[-1, 1]`` at the official evaluation size."""
    height, width = image.shape[:2]
    resized = resize_uint8(image, resized_shape(height, width, short_side, long_side))
    return (resized.permute(2, 0, 1)[None].float().div(255) - 0.5) / 0.5


@dataclass
class SegPass:
    """One segmentation pass: ``logits`` ``B,h*w,C`` (float32), ResNet ``features`` ``B,h*w,1024`` (the kNN
    features), the token ``grid``."""

    logits: torch.Tensor
    features: torch.Tensor
    grid: tuple[int, int]


def segmentation_pass(model, images: torch.Tensor, prompt_tokens: torch.Tensor, category_embeddings: torch.Tensor
                      ) -> SegPass:
    """Normalised ``images`` ``B,3,H,W``, the prompt ``L`` and category embeddings ``C,D`` -> :class:`SegPass`."""
    features = model.encoder.image_features(images)
    grid = tuple(features.shape[-2:])
    tokens = prompt_tokens.to(images.device).expand(images.shape[0], -1)
    decoded, _ = model(tokens, model.encoder.project_features(features), grid)
    logits = decoded[:, :-1].float() @ category_embeddings.float().T
    return SegPass(logits, features.flatten(2).transpose(1, 2).float(), grid)


def knn_probabilities(logits: torch.Tensor, features: torch.Tensor, k: int = DEFAULT_K, iters: int = DEFAULT_ITERS
                      ) -> torch.Tensor:
    """Softmax of ``logits`` ``B,P,C`` smoothed over each token's ``k`` feature neighbours, ``iters`` times."""
    return knn_smooth(torch.softmax(logits.float(), dim=-1), features, k, iters)


def grid_to_image(maps: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Per-token maps ``B,h*w,C`` -> ``B,C,H,W`` (bilinear, align_corners=False; mmseg ``resize``)."""
    batch, _, channels = maps.shape
    maps = maps.transpose(1, 2).reshape(batch, channels, *grid)
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
