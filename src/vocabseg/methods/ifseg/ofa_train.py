"""Image-free training of IFSeg on OFA, as the official recipe (``run_scripts/IFSeg/*.sh``, ``SegCriterion``).

A sample is an artificial map: ``U, V ~ U{1..32}`` (``torch.randint(1, 33, (2,))``), a class per cell
(``np.random.choice(C, U*V)``, i.i.d.), nearest-upsampled to the 32x32 token grid (the tokens: each cell's word
embedding, the mean of its BPE token embeddings, put where ``image_proj`` output goes) and to the 512x512 target. With
a hierarchy each cell then draws one of its class's words uniformly (an extra draw the single-word setting never
makes). The loss is the cross-entropy of the decoder logits (32x32, the category embeddings as classifier) bilinearly
upsampled to 512x512, averaged over pixels and samples.

Frozen: the ResNet, ``image_proj`` and the token embedding (so the category embeddings); everything else trains,
including IFSeg's seg position tables. AdamW (0.9, 0.999, eps 1e-8, decoupled weight decay 0.1 on every trained
tensor, as fairseq's ``adam``), lr 5e-5 with a cosine decay to 0 and no warm-up, gradient norm clipped at 1, batch 16,
2000 iterations; dropout 0.1 and drop path 0.1 as the scripts set them.

Every random draw of a step is a function of (seed, step, rank): sample ``i`` of the global batch uses generators
seeded with ``sample_seed(seed, step * batch + i)`` and the dropout RNG is reseeded each step, so a run resumed from
a checkpoint continues exactly as the uninterrupted one (same world size). Under ``torchrun`` each rank draws its
share of the batch and gradients are averaged over the ranks. On a GPU the forward runs under bf16 autocast by
default (the official runs used fp16 with loss scaling: ``precision="fp16"``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vocabseg.distributed import DistInfo, all_reduce, init_distributed
from vocabseg.errors import UsageError
from vocabseg.io.outputs import atomic_write
from vocabseg.methods.ifseg.ofa import category_prompt, grid_to_image, word_token_ids
from vocabseg.methods.ifseg.sampler import DEFAULT_MAX_CELLS, WordSet, upsample_nearest
from vocabseg.methods.ifseg.train import cosine_lr
from vocabseg.models.checkpoints import read_training_checkpoint
from vocabseg.models.ofa.weights import CHECKPOINT_FORMAT, OFAWeightsError
from vocabseg.pipeline.windows import autocast

log = logging.getLogger(__name__)

#: Parameters the official freeze flags keep fixed (``--freeze-entire-resnet``, ``--freeze-{encoder,decoder,seg}-
#: embedding``); the category embeddings are not parameters here but means of the frozen token embedding.
FROZEN_PREFIXES = ("encoder.embed_images.", "encoder.image_proj.", "encoder.embed_tokens.", "decoder.embed_tokens.")


@dataclass(frozen=True)
class OFATrainConfig:
    """Training hyper-parameters (stored in the checkpoint; a resumed run must use the same ones)."""

    iterations: int = 2000
    batch_size: int = 16
    micro_batch: int = 0  # samples per forward pass on each rank (gradient accumulation); 0: the rank's share
    lr: float = 5e-5
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    max_cells: int = DEFAULT_MAX_CELLS
    target_size: int = 512
    seed: int = 0
    save_every: int = 100
    precision: str = "fp32"


def freeze(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Apply the official freeze policy; returns the trained parameters."""
    trained = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(not name.startswith(FROZEN_PREFIXES))
        if parameter.requires_grad:
            trained.append(parameter)
    return trained


def sample_seed(seed: int, index: int) -> int:
    """The seed of the ``index``-th sample of a run."""
    return (seed * 1_000_003 + index) % 2 ** 32


def artificial_sample(words: WordSet, sizes: torch.Generator, cells: np.random.RandomState, grid: tuple[int, int],
                      target: tuple[int, int], max_cells: int = DEFAULT_MAX_CELLS
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One artificial map: the class grid ``U,V``, the word ids on the token ``grid`` and the class ids on
    ``target``. ``sizes`` draws ``U, V``; ``cells`` the classes (and, with several words per class, the words)."""
    u, v = torch.randint(1, max_cells + 1, (2,), generator=sizes).tolist()
    classes = torch.from_numpy(cells.choice(words.num_classes, u * v).reshape(u, v)).long()
    per_class = words.class_words()
    counts = torch.tensor([len(w) for w in per_class])
    grouped = torch.cat(per_class)
    offsets = torch.cumsum(counts, 0) - counts
    pick = torch.zeros_like(classes)
    if (counts > 1).any():
        pick = torch.from_numpy(cells.randint(0, counts[classes].numpy())).long()
    chosen = grouped[offsets[classes] + pick]
    return classes, upsample_nearest(chosen, grid), upsample_nearest(classes, target)


def imagefree_loss(model, prompt_tokens: torch.Tensor, word_embeddings: torch.Tensor,
                   class_embeddings: torch.Tensor, word_maps: torch.Tensor, targets: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the upsampled logits and the logits ``B,h*w+1,C`` of artificial maps.

    ``word_maps`` ``B,h,w`` index ``word_embeddings`` ``W,D`` (the image tokens), ``targets`` ``B,H,W`` are class ids;
    the classifier is ``class_embeddings`` ``C,D``.
    """
    grid = tuple(word_maps.shape[-2:])
    tokens = word_embeddings[word_maps.flatten(1)]
    decoded, _ = model(prompt_tokens.expand(word_maps.shape[0], -1), tokens, grid)
    logits = decoded.float() @ class_embeddings.float().T
    upsampled = grid_to_image(logits[:, :-1], grid, tuple(targets.shape[-2:]))
    return F.cross_entropy(upsampled, targets), logits


@dataclass
class ImageFreeTask:
    """What training sees: the class labels, the words (each class's classifier word first) and the BPE tokens."""

    labels: tuple[str, ...]
    words: WordSet
    prompt_tokens: torch.Tensor
    word_tokens: tuple[torch.Tensor, ...]

    @classmethod
    def build(cls, tokenizer, labels, names, hierarchy=None) -> ImageFreeTask:
        """``names[c][0]`` is class ``c``'s category word (prompt and classifier); its other names and its
        ``hierarchy`` words only fill artificial maps."""
        words = WordSet.build(names, labels, hierarchy)
        prompt = category_prompt(tokenizer, [group[0] for group in names])
        return cls(tuple(labels), words, prompt.tokens, word_token_ids(tokenizer, words.words))

    @property
    def class_words(self) -> tuple[str, ...]:
        return tuple(self.words.words[w[0]] for w in self.words.class_words())

    def embeddings(self, model) -> tuple[torch.Tensor, torch.Tensor]:
        """Word embeddings ``W,D`` and category embeddings ``C,D`` (each class's first word)."""
        with torch.no_grad():
            words = model.embed_words(list(self.word_tokens))
        first = torch.stack([w[0] for w in self.words.class_words()])
        return words, words[first.to(words.device)]


# --- torch.distributed: the only functions of this module that use it ---------------------------------------------

def mean_over_ranks(tensors: list[torch.Tensor], dist_info: DistInfo) -> None:
    """Average ``tensors`` in place over the processes."""
    for tensor in tensors:
        all_reduce(tensor, dist_info).div_(dist_info.world_size)


# --- one training run --------------------------------------------------------------------------------------------

@dataclass
class StepInputs:
    """What every step reads: the prompt, word ``W,D`` and category ``C,D`` embeddings, the token ``grid`` and loss
    ``target`` sizes, and this rank's share of the global batch."""

    task: ImageFreeTask
    config: OFATrainConfig
    prompt: torch.Tensor
    word_embeddings: torch.Tensor
    class_embeddings: torch.Tensor
    grid: tuple[int, int]
    target: tuple[int, int]
    dist: DistInfo

    @classmethod
    def build(cls, model, task: ImageFreeTask, config: OFATrainConfig) -> StepInputs:
        words, classes = task.embeddings(model)
        dist_info = init_distributed(str(words.device))
        if config.batch_size % dist_info.world_size:
            raise UsageError(f"batch size {config.batch_size} is not a multiple of the {dist_info.world_size} "
                             "processes")
        return cls(task, config, task.prompt_tokens.to(words.device), words, classes, (model.config.seg_grid,) * 2,
                   (config.target_size,) * 2, dist_info)

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world(self) -> int:
        return self.dist.world_size

    @property
    def per_rank(self) -> int:
        return self.config.batch_size // self.world

    def micro_batches(self, step: int) -> list[range]:
        """The global sample indices of each forward pass of this rank at ``step``."""
        first = step * self.config.batch_size + self.rank * self.per_rank
        micro = self.config.micro_batch or self.per_rank
        return [range(first + start, first + min(start + micro, self.per_rank))
                for start in range(0, self.per_rank, micro)]

    def samples(self, indices: range) -> tuple[torch.Tensor, torch.Tensor]:
        """Word maps ``B,h,w`` and class targets ``B,H,W`` of the samples ``indices``, each from its own seeds."""
        seed, device = self.config.seed, self.word_embeddings.device
        drawn = [artificial_sample(self.task.words, torch.Generator().manual_seed(sample_seed(seed, i)),
                                   np.random.RandomState(sample_seed(seed, i)), self.grid, self.target,
                                   self.config.max_cells) for i in indices]
        return torch.stack([s[1] for s in drawn]).to(device), torch.stack([s[2] for s in drawn]).to(device)


def accumulate_gradients(model, inputs: StepInputs, step: int, scaler: torch.amp.GradScaler) -> torch.Tensor:
    """Backward passes over this rank's share of step ``step``; returns its mean loss."""
    total = torch.zeros((), device=inputs.word_embeddings.device)
    for indices in inputs.micro_batches(step):
        word_maps, targets = inputs.samples(indices)
        with autocast(inputs.config.precision, word_maps.device):
            loss, _ = imagefree_loss(model, inputs.prompt, inputs.word_embeddings, inputs.class_embeddings,
                                     word_maps, targets)
        share = len(indices) / inputs.per_rank
        scaler.scale(loss * share).backward()
        total += loss.detach() * share
    return total


def train_step(model, inputs: StepInputs, step: int, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               trained: list[torch.nn.Parameter]) -> float:
    """One optimiser step (cosine learning rate, dropout reseeded, gradients averaged over the ranks, clipped);
    returns the mean loss over the global batch."""
    config = inputs.config
    for group in optimizer.param_groups:
        group["lr"] = cosine_lr(config.lr, step, config.iterations)
    torch.manual_seed(sample_seed(config.seed + 1, step * inputs.world + inputs.rank))  # dropout and drop path
    optimizer.zero_grad(set_to_none=True)
    total = accumulate_gradients(model, inputs, step, scaler)
    mean_over_ranks([p.grad for p in trained if p.grad is not None] + [total], inputs.dist)
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(trained, config.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return float(total)


def restore(resume: dict | None, model, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler
            ) -> tuple[int, list[float]]:
    """Load a checkpoint's model and training state; returns the step to continue from and the losses so far."""
    if resume is None:
        return 0, []
    model.load_state_dict(resume["model"])
    optimizer.load_state_dict(resume["optimizer"])
    if resume.get("scaler"):
        scaler.load_state_dict(resume["scaler"])
    return resume["step"], list(resume["losses"])


def train_ofa(model, task: ImageFreeTask, config: OFATrainConfig, out: str | os.PathLike,
              resume: dict | None = None, meta: dict | None = None, progress: bool = True) -> list[float]:
    """Train ``model`` (an :class:`~vocabseg.models.ofa.OFA`) on artificial maps of ``task``; checkpoints go to
    ``out`` (rank 0). Returns the per-step losses (mean over the global batch)."""
    from tqdm import tqdm

    inputs = StepInputs.build(model, task, config)
    trained = freeze(model)
    optimizer = torch.optim.AdamW(trained, lr=config.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(inputs.word_embeddings.device.type, enabled=config.precision == "fp16")
    start, losses = restore(resume, model, optimizer, scaler)
    model.train()
    bar = tqdm(range(start, config.iterations), desc="train ifseg", unit="it", initial=start,
               total=config.iterations, disable=not progress or inputs.rank != 0 or None)
    for step in bar:
        losses.append(train_step(model, inputs, step, optimizer, scaler, trained))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        done = step + 1
        if inputs.rank == 0 and (done % config.save_every == 0 or done == config.iterations):
            save_ofa_checkpoint(out, model, task, config, done, losses, optimizer, scaler, meta)
    model.eval()
    return losses


def save_ofa_checkpoint(path: str | os.PathLike, model, task: ImageFreeTask, config: OFATrainConfig, step: int,
                        losses: list[float], optimizer: torch.optim.Optimizer, scaler=None,
                        meta: dict | None = None) -> None:
    """The whole model (fairseq names, usable as ``--checkpoint`` or ``--weights``) with the training state, written
    atomically; plain types only (read back with ``weights_only=True``)."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "config": model.config.to_dict(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "labels": list(task.labels),
        "words": list(task.class_words),
        "map_words": list(task.words.words),
        "word_class": list(task.words.word_class),
        "train_config": dataclasses.asdict(config),
        "step": step,
        "losses": list(losses),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else {},
        "meta": dict(meta or {}),
    }
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def load_ofa_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint of ``vocabseg train ifseg`` safely (``weights_only=True``)."""
    return read_training_checkpoint(path, CHECKPOINT_FORMAT, "OFA IFSeg checkpoint", "train ifseg", OFAWeightsError)
