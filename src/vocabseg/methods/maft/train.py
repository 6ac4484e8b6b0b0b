"""Mask-aware fine-tuning of IP-CLIP (spec A.4, A.5): plain PyTorch, AdamW, poly LR, gradient clipping and
accumulation, atomic checkpoints with exact ``--resume``, and data parallelism across processes (torchrun).

Training data is any sequence of ``(image uint8 H,W,3, labels H,W)`` or ``(image, labels, proposals N,H,W)``
items with labels already mapped to training-class indices (255 = ignore). Every sample's augmentation and
proposals are drawn from a generator seeded by ``(seed, iteration, position in the global batch)``, so a resumed
or multi-process run sees exactly the samples of a single uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vocabseg.distributed import all_reduce, barrier, init_distributed
from vocabseg.errors import UsageError
from vocabseg.io.outputs import atomic_write
from vocabseg.methods.maft.ipclip import IPCLIP, MAFT_NORMALIZATION, VILD_TEMPLATES, set_trainable
from vocabseg.methods.maft.losses import mask_aware_loss, self_distill_loss
from vocabseg.methods.maft.proposals import perturb_gt
from vocabseg.methods.maft.train_config import TrainConfig
from vocabseg.models.encoder import CLIP
from vocabseg.models.openclip import OpenCLIPViT, from_open_clip
from vocabseg.pipeline import postprocess
from vocabseg.pipeline.preprocess import preprocess
from vocabseg.text.classes import ClassSpec
from vocabseg.text.classifier import TextCache, TextClassifier

log = logging.getLogger(__name__)

IGNORE = 255
#: The value the released data mapper pads training images with (before CLIP normalisation).
PAD_VALUE = 128


# --- samples ----------------------------------------------------------------------------------------------------

def normalise(image: torch.Tensor) -> torch.Tensor:
    """uint8 (or 0..255 float) ``H,W,3`` -> CLIP-normalised ``3,H,W`` (MAFT's full-precision statistics)."""
    return preprocess(image, None, normalization=MAFT_NORMALIZATION)[0]


def augment(image: np.ndarray, labels: np.ndarray, proposals: np.ndarray | None, rng: np.random.Generator | None,
            crop: int, scale_range: tuple[float, float]):
    """Random rescale (short side ``crop * U(scale_range)``), random crop, horizontal flip, pad to ``crop``; with
    ``rng`` None only the padding (an image larger than ``crop`` is cut at the bottom and right).

    As the released data mapper, the padding is grey (128) before normalisation. Returns the normalised image
    ``3,crop,crop``, labels ``crop,crop`` (padding 255) and proposals ``N,crop,crop`` (padding 0) or None.
    """
    x = normalise(torch.from_numpy(np.array(image)))
    planes = [torch.from_numpy(labels.astype(np.int64))[None]]
    if proposals is not None:
        planes.append(torch.from_numpy(proposals.astype(np.int64)))
    nearest = torch.cat(planes)
    if rng is not None:
        height, width = labels.shape
        scale = crop * rng.uniform(*scale_range) / min(height, width)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
        nearest = F.interpolate(nearest[None].float(), size=size, mode="nearest")[0].long()
        y0 = int(rng.integers(0, max(size[0] - crop, 0) + 1))
        x0 = int(rng.integers(0, max(size[1] - crop, 0) + 1))
        x, nearest = x[:, y0:y0 + crop, x0:x0 + crop], nearest[:, y0:y0 + crop, x0:x0 + crop]
        if rng.random() < 0.5:
            x, nearest = x.flip(-1), nearest.flip(-1)
    x, nearest = x[:, :crop, :crop], nearest[:, :crop, :crop]
    height, width = x.shape[-2:]
    out = normalise(torch.full((1, 1, 3), PAD_VALUE, dtype=torch.uint8)).expand(3, crop, crop).clone()
    out[:, :height, :width] = x
    pad = (0, crop - width, 0, crop - height)
    out_labels = F.pad(nearest[0], pad, value=IGNORE)
    out_proposals = F.pad(nearest[1:], pad).bool() if proposals is not None else None
    return out, out_labels, out_proposals


@dataclass
class Sample:
    image: torch.Tensor  # 3,S,S (IP-CLIP input)
    proposals: torch.Tensor  # N,crop,crop float
    gt_masks: torch.Tensor  # K,crop,crop
    gt_labels: torch.Tensor  # K


def make_sample(item, rng: np.random.Generator, cfg: TrainConfig) -> Sample:
    """Augment one dataset item and attach its proposals (given ones, else perturbed ground truth)."""
    image, labels = item[0], item[1]
    given = item[2] if len(item) > 2 else None
    x, labels, proposals = augment(image, labels, given, rng if cfg.augment else None, cfg.crop_size,
                                   cfg.scale_range)
    if proposals is None:
        proposals = torch.from_numpy(perturb_gt(labels.numpy(), rng, IGNORE, cfg.max_proposals))
    present = [int(c) for c in labels.unique() if c != IGNORE]
    gt_masks = torch.stack([labels == c for c in present]) if present else torch.zeros(0, *labels.shape)
    image = F.interpolate(x[None], size=(cfg.input_size,) * 2, mode="bilinear", align_corners=False)[0]
    return Sample(image, proposals[: cfg.max_proposals].float(), gt_masks.float(), torch.tensor(present).long())


def sample_index(seed: int, position: int, length: int) -> int:
    """Dataset index of the ``position``-th sample drawn overall: a fresh seeded permutation per epoch."""
    epoch, offset = divmod(position, length)
    return int(np.random.default_rng((seed, epoch)).permutation(length)[offset])


# --- the trainer ------------------------------------------------------------------------------------------------

def open_clip_model(clip: CLIP) -> torch.nn.Module:
    """The open_clip model behind ``clip`` (both towers: what the trainer updates and saves)."""
    model = getattr(clip.text, "model", None)
    if not isinstance(clip.image, OpenCLIPViT) or getattr(model, "visual", None) is not clip.image.visual:
        raise UsageError(f"MAFT fine-tunes open_clip CLIP ViTs; {clip.name or 'this model'} is not one")
    return model


class Trainer:
    """Fine-tunes ``clip``'s image tower in place (an open_clip CLIP, as :func:`vocabseg.models.openclip.load_clip`
    returns it); a frozen copy taken at construction is the teacher. Under torchrun every process holds a copy and
    their gradients are summed (:func:`vocabseg.distributed.init_distributed`: gloo on the CPU, nccl on GPUs)."""

    def __init__(self, clip: CLIP, dataset: Sequence, class_names: Sequence[str], cfg: TrainConfig,
                 out: str | os.PathLike, text_cache: TextCache | None = None):
        self.model = open_clip_model(clip)
        self.dist = init_distributed(str(clip.device))
        self.rank, self.world = self.dist.rank, self.dist.world_size
        per_rank, remainder = divmod(cfg.batch_size, self.world)
        if remainder or per_rank % cfg.micro_batch:
            raise UsageError(f"batch size {cfg.batch_size} must split into {self.world} process(es) x whole "
                             f"micro-batches of {cfg.micro_batch}")
        if len(dataset) == 0:
            raise UsageError("the training set is empty")
        self.cfg, self.dataset, self.out = cfg, dataset, Path(out)
        self.clip = clip
        self.teacher = from_open_clip(copy.deepcopy(self.model).requires_grad_(False), name="teacher")
        spec = ClassSpec(labels=tuple(class_names), names=tuple((n,) for n in class_names), has_background=False)
        classifier = TextClassifier.build(clip.text, spec, VILD_TEMPLATES, text_cache)
        self.text = classifier.embeddings.clone()
        self.query_class = classifier.query_class.clone()
        self.num_classes = spec.num_classes
        self.names = set_trainable(self.model, cfg.freeze)
        params = dict(self.model.named_parameters())
        norms = [params[n] for n in self.names if ".ln_" in n or n.startswith("visual.ln_")]
        others = [params[n] for n in self.names if not (".ln_" in n or n.startswith("visual.ln_"))]
        self.optimizer = torch.optim.AdamW([{"params": others, "weight_decay": cfg.weight_decay},
                                            {"params": norms, "weight_decay": 0.0}], lr=cfg.lr)
        self.student = IPCLIP(clip.image, cfg.start_layer)
        self.frozen = IPCLIP(self.teacher.image, cfg.start_layer)
        self.iteration = 0

    # one iteration = accumulate (forward/backward over this process's micro-batches, all-reduce) + step
    def class_probs(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``...,C`` of embeddings ``...,E``: softmax over the training classes' queries."""
        logits = embeddings @ self.text.to(embeddings.dtype).T
        flat = logits.reshape(-1, logits.shape[-1]).T
        probs = postprocess.class_scores(flat, self.query_class, self.num_classes, self.cfg.temperature)
        return probs.T.reshape(*logits.shape[:-1], self.num_classes)

    def micro_loss(self, samples: list[Sample]) -> tuple[torch.Tensor, float, float]:
        device = self.clip.device
        images = torch.stack([s.image for s in samples]).to(device)
        most = max(1, max(len(s.proposals) for s in samples))
        masks = images.new_zeros(len(samples), most, *samples[0].proposals.shape[-2:])
        for b, s in enumerate(samples):
            masks[b, : len(s.proposals)] = s.proposals.to(device)
        amp = torch.autocast("cuda", torch.bfloat16, enabled=self.cfg.amp and device.type == "cuda")
        with amp:
            probs = self.class_probs(self.student.encode(images, masks)).float()
            ma = mask_aware_loss([p[: len(s.proposals)] for p, s in zip(probs, samples, strict=True)],
                                 [s.proposals.to(device) for s in samples], [s.gt_masks.to(device) for s in samples],
                                 [s.gt_labels.to(device) for s in samples])
            dis = torch.zeros((), device=device)
            if self.cfg.dis_weight > 0:
                with torch.no_grad():
                    teacher = self.class_probs(self.frozen.encode(images)).float()
                student = self.class_probs(self.student.encode(images)).float()
                dis = self_distill_loss(student, teacher, self.cfg.dis_loss)
        return ma + self.cfg.dis_weight * dis, float(ma.detach()), float(dis.detach())

    def accumulate(self, iteration: int) -> dict[str, float]:
        """Gradients of one iteration (summed over processes); returns the mean losses of this process."""
        cfg = self.cfg
        per_rank = cfg.batch_size // self.world
        micro_total = cfg.batch_size // cfg.micro_batch
        self.optimizer.zero_grad(set_to_none=True)
        totals = np.zeros(2)
        for start in range(0, per_rank, cfg.micro_batch):
            positions = range(self.rank * per_rank + start, self.rank * per_rank + start + cfg.micro_batch)
            samples = [make_sample(self.dataset[sample_index(cfg.seed, iteration * cfg.batch_size + j,
                                                             len(self.dataset))],
                                   np.random.default_rng((cfg.seed, iteration, j)), cfg) for j in positions]
            loss, ma, dis = self.micro_loss(samples)
            (loss / micro_total).backward()
            totals += (ma, dis)
        if self.world > 1:
            for p in self.optimizer.param_groups[0]["params"] + self.optimizer.param_groups[1]["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                all_reduce(p.grad, self.dist)
        steps = per_rank // cfg.micro_batch
        return {"ma_loss": totals[0] / steps, "dis_loss": cfg.dis_weight * totals[1] / steps}

    def step(self, iteration: int) -> float:
        """Poly learning rate, global gradient-norm clipping and the AdamW update; returns the gradients' global
        L2 norm before clipping."""
        cfg = self.cfg
        lr = cfg.lr * (1 - iteration / cfg.iterations) ** cfg.poly_power
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        return float(norm)

    # checkpoints
    def save_checkpoint(self) -> Path:
        """``last.pt``: completed iterations, trainable parameters, optimizer state (rank 0, atomic)."""
        path = self.out / "last.pt"
        if self.rank == 0:
            params = dict(self.model.named_parameters())
            state = {"iteration": self.iteration, "config": dataclasses.asdict(self.cfg),
                     "model": {n: params[n].detach().cpu() for n in self.names},
                     "optimizer": self.optimizer.state_dict()}
            with atomic_write(path) as tmp:
                torch.save(state, tmp)
        barrier(self.dist)  # no rank runs ahead (or stops) before the checkpoint is on disk
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        state = torch.load(path, map_location=self.clip.device, weights_only=True)
        if sorted(state["model"]) != sorted(self.names):
            raise UsageError(f"{path} was written with another freeze policy or model; cannot resume")
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state["model"].items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration = int(state["iteration"])

    def save_weights(self) -> Path:
        """The fine-tuned CLIP as a safetensors state dict, usable as ``--weights`` with ``--method maft``."""
        from safetensors.torch import save_file

        path = self.out / "maft-clip.safetensors"
        if self.rank == 0:
            state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
            with atomic_write(path) as tmp:
                save_file(state, str(tmp))
        barrier(self.dist)
        return path

    def train(self, stop_at: int | None = None) -> dict[str, float]:
        """Run to ``cfg.iterations`` (or stop after iteration ``stop_at``, checkpointed); returns the last losses."""
        from tqdm import tqdm

        cfg = self.cfg
        end = min(cfg.iterations, stop_at or cfg.iterations)
        losses: dict[str, float] = {}
        bar = tqdm(range(self.iteration, end), initial=self.iteration, total=cfg.iterations, desc="train maft",
                   disable=None if self.rank == 0 else True)
        for iteration in bar:
            losses = self.accumulate(iteration)
            losses["grad_norm"] = self.step(iteration)
            self.iteration = iteration + 1
            bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items()})
            if self.rank == 0 and (self.iteration % cfg.log_every == 0 or self.iteration == end):
                log.info("iter %d/%d ma_loss %.5f dis_loss %.3g grad_norm %.3g lr %.3g", self.iteration,
                         cfg.iterations, losses["ma_loss"], losses["dis_loss"], losses["grad_norm"],
                         self.optimizer.param_groups[0]["lr"])
            if self.iteration % cfg.checkpoint_every == 0 or self.iteration == end:
                self.save_checkpoint()
        if self.iteration >= cfg.iterations:
            self.save_weights()
        return losses


# --- data ---------------------------------------------------------------------------------------------------------

class SegmentationFolder(Sequence):
    """``(image, labels[, proposals])`` items from an image folder and a label folder (and a proposal folder).

    Labels are mapped through ``label_map`` (256 entries: dataset id -> training index, 255 = ignore).
    Proposal files are ``<stem>.npz`` or ``<stem>.png`` (see :func:`.proposals.read_proposal_file`).
    """

    def __init__(self, images: Path, labels: Path, label_map: np.ndarray, label_suffix: str = ".png",
                 proposals: Path | None = None):
        self.label_map = label_map
        pairs = []
        for image in sorted(Path(images).glob("*.jpg")):
            label = Path(labels) / f"{image.stem}{label_suffix}"
            if label.exists():
                pairs.append((image, label))
        if not pairs:
            raise UsageError(f"no image/label pairs found in {images} and {labels} (labels named <stem>{label_suffix})")
        self.pairs = pairs
        self.proposals = Path(proposals) if proposals else None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        from PIL import Image

        from vocabseg.methods.maft.proposals import read_proposal_file

        image_path, label_path = self.pairs[index]
        image = np.asarray(Image.open(image_path).convert("RGB"))
        labels = self.label_map[np.asarray(Image.open(label_path)).astype(np.int64).clip(0, 255)]
        if self.proposals is None:
            return image, labels
        stem = image_path.stem
        file = next((self.proposals / f"{stem}{s}" for s in (".npz", ".png")
                     if (self.proposals / f"{stem}{s}").exists()), None)
        if file is None:
            raise UsageError(f"no proposal file {stem}.npz or {stem}.png in {self.proposals}")
        masks = read_proposal_file(file, labels.shape).masks.numpy() >= 0.5
        return image, labels, masks


def coco_stuff_train(root: str | os.PathLike, split: str, proposals: str | None = None):
    """COCO-Stuff-164k training images with 0..170 train-id label maps (255 = ignore), as mmseg's converter or
    detectron2's ``stuffthingmaps_detectron2`` write them. ``split``: ``zs156`` (the 15 unseen classes become
    ignore, so their names never reach the loss) or ``all``. Returns (dataset, training class names)."""
    from vocabseg.data.classes import CLASSES, ZERO_SHOT_SPLITS

    classes = CLASSES["coco-stuff"]
    if split == "zs156":
        unseen = set(ZERO_SHOT_SPLITS["coco-stuff"]["unseen"])
    elif split == "all":
        unseen = set()
    else:
        raise UsageError(f"unknown COCO-Stuff training split {split!r}; use zs156 or all")
    seen = [i for i in range(len(classes)) if i not in unseen]
    label_map = np.full(256, IGNORE, dtype=np.int64)
    label_map[seen] = np.arange(len(seen))
    root = Path(root)
    layouts = [(root / "images" / "train2017", root / "annotations" / "train2017", "_labelTrainIds.png"),
               (root / "train2017", root / "stuffthingmaps_detectron2" / "train2017", ".png")]
    for images, labels, suffix in layouts:
        if images.is_dir() and labels.is_dir():
            dataset = SegmentationFolder(images, labels, label_map, suffix, Path(proposals) if proposals else None)
            return dataset, [classes[i] for i in seen]
    raise UsageError(f"COCO-Stuff not found under {root}: expected images/train2017 + annotations/train2017 "
                     "(*_labelTrainIds.png, mmseg layout) or train2017 + stuffthingmaps_detectron2/train2017")
