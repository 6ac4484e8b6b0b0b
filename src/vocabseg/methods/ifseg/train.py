"""Image-free training of the CLIP-based head: artificial word maps in, class maps out, no image anywhere.

:func:`train` takes only :class:`TextTargets` (text embeddings of the category words and of the class queries);
there is no argument through which an image could enter. A training sample is an artificial map
(:func:`vocabseg.methods.ifseg.sampler.sample_maps`) whose tokens are ``normalize(t_word + eps)``, ``eps ~ N(0, s2 I)``
(CapDec-style noise that mimics the text-to-patch modality gap, spec B.10-4); the loss is cross-entropy of
``temperature * <head(z)_p, t_q>`` (maximum over a class's names) against the class map at token resolution.

Optimisation: AdamW (betas 0.9/0.999, decoupled weight decay), cosine learning rate without warm-up, gradient
norm clipped at 1. All randomness (head initialisation, maps, words, noise) comes from ``seed``; the sampler's
generator state is checkpointed, so ``resume`` continues exactly where an interrupted run stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vocabseg.io.outputs import atomic_write
from vocabseg.methods.ifseg.sampler import DEFAULT_MAX_CELLS, WordSet, sample_maps
from vocabseg.models.ifseg_head import CHECKPOINT_FORMAT, HeadConfig, IFSegHead
from vocabseg.pipeline.postprocess import max_over_names

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters (stored in the checkpoint; a resumed run must use the same ones)."""

    iterations: int = 1000
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    noise_var: float = 0.016
    max_cells: int = DEFAULT_MAX_CELLS
    grid: tuple[int, int] = (16, 16)
    temperature: float = 40.0
    seed: int = 0
    save_every: int = 200

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        return cls(**{**data, "grid": tuple(data["grid"])})


@dataclass
class TextTargets:
    """Everything training sees: word embeddings ``(W,E)`` for the maps, query embeddings ``(Q,E)`` to classify."""

    labels: tuple[str, ...]
    words: WordSet
    word_embeddings: torch.Tensor
    query_embeddings: torch.Tensor
    query_class: torch.Tensor

    @functools.cached_property
    def text_mean(self) -> torch.Tensor:
        """The class-balanced mean word embedding (the expected token of an artificial map)."""
        word_class = torch.tensor(self.words.word_class)
        means = [self.word_embeddings[word_class == c].mean(0) for c in range(len(self.labels))]
        return torch.stack(means).mean(0)


def build_targets(text_encoder, labels: Sequence[str], names: Sequence[Sequence[str]], hierarchy=None,
                  cache=None) -> TextTargets:
    """Prompt-ensembled text embeddings of the class names and of every (hierarchy) word, from ``text_encoder`` (a
    :class:`~vocabseg.models.encoder.TextEncoder`)."""
    from vocabseg.text.classifier import embed_names
    from vocabseg.text.templates import IMAGENET_TEMPLATES

    words = WordSet.build(names, labels, hierarchy)
    queries = [n for group in names for n in group]
    vocabulary = list(dict.fromkeys([*queries, *words.words]))
    embeddings = embed_names(text_encoder, vocabulary, IMAGENET_TEMPLATES, cache).clone().float().cpu()
    row = {name: i for i, name in enumerate(vocabulary)}
    query_class = torch.tensor([c for c, group in enumerate(names) for _ in group])
    return TextTargets(tuple(labels), words, embeddings[[row[w] for w in words.words]],
                       embeddings[[row[q] for q in queries]], query_class)


def artificial_batch(targets: TextTargets, config: TrainConfig, generator: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy word-embedding tokens ``B,N,E`` and their class labels ``B,N`` on ``config.grid``."""
    classes, words = sample_maps(targets.words, config.batch_size, config.grid, generator, config.max_cells)
    tokens = targets.word_embeddings[words.flatten(1)]
    noise = torch.randn(tokens.shape, generator=generator) * math.sqrt(config.noise_var)
    return F.normalize(tokens + noise, dim=-1), classes.flatten(1)


def class_logits(head: IFSegHead, tokens: torch.Tensor, targets: TextTargets, config: TrainConfig) -> torch.Tensor:
    """``B,N,C`` logits: ``temperature * <head(tokens), t_q>``, maximum over each class's queries."""
    refined = head(tokens, config.grid, targets.text_mean)
    logits = config.temperature * refined @ targets.query_embeddings.T
    return max_over_names(logits.permute(2, 0, 1), targets.query_class, len(targets.labels)).permute(1, 2, 0)


def loss_on(head: IFSegHead, tokens: torch.Tensor, labels: torch.Tensor, targets: TextTargets,
            config: TrainConfig) -> torch.Tensor:
    """Mean cross-entropy of the head's class logits against the artificial class map."""
    logits = class_logits(head, tokens, targets, config)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def cosine_lr(base: float, step: int, total: int) -> float:
    """The learning rate of ``step`` (0-based) of ``total`` under a cosine decay to 0 without warm-up."""
    return base * 0.5 * (1 + math.cos(math.pi * step / total))


def new_head(head_config: HeadConfig, seed: int) -> IFSegHead:
    """A head initialised from ``seed`` (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return IFSegHead(head_config)


def train(head: IFSegHead, targets: TextTargets, config: TrainConfig, out: str | os.PathLike,
          resume: dict | None = None, meta: dict | None = None, progress: bool = True) -> list[float]:
    """Train ``head`` on artificial maps, writing checkpoints to ``out``; returns the per-step losses.

    ``resume``: a checkpoint of this run (see :func:`load_checkpoint`) to continue from. ``meta`` is stored in
    the checkpoint as is (backbone description, class names).
    """
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    step, losses = 0, []
    if resume is not None:
        head.load_state_dict(resume["head"])
        optimizer.load_state_dict(resume["optimizer"])
        generator.set_state(resume["generator"])
        step, losses = resume["step"], list(resume["losses"])
    head.train()
    bar = tqdm(range(step, config.iterations), desc="train ifseg-clip", unit="it", disable=not progress or None,
               initial=step, total=config.iterations)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(config.lr, step, config.iterations)
        tokens, labels = artificial_batch(targets, config, generator)
        loss = loss_on(head, tokens, labels, targets, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), config.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        done = step + 1
        if done % config.save_every == 0 or done == config.iterations:
            save_checkpoint(out, head, config, done, losses, optimizer, generator, targets, meta)
    head.eval()
    return losses


def save_checkpoint(path: str | os.PathLike, head: IFSegHead, config: TrainConfig, step: int, losses: list[float],
                    optimizer: torch.optim.Optimizer, generator: torch.Generator, targets: TextTargets,
                    meta: dict | None = None) -> None:
    """Write the head, the training state and the class list atomically (``torch.save``, plain types only)."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "head_config": head.config.to_dict(),
        "head": {k: v.detach().cpu() for k, v in head.state_dict().items()},
        "train_config": dataclasses.asdict(config),
        "step": step,
        "losses": list(losses),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "classes": list(targets.labels),
        "words": list(targets.words.words),
        "word_class": list(targets.words.word_class),
        "meta": dict(meta or {}),
    }
    with atomic_write(path) as tmp:
        torch.save(state, tmp)

