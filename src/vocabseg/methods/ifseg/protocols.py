"""The paper's image-free evaluation protocols (IFSeg section 3, spec B.8): which names train, which classes are
predicted at evaluation, and how a dataset's ground-truth ids map onto them.

* ``coco-stuff-unseen15``: train on the 15 unseen COCO-Stuff names; evaluate 15-way on COCO-Stuff val2017, every
  pixel of another class ignored (not the GZSS/hIoU protocol of MAFT).
* ``coco-to-ade150``: train on the 171 COCO-Stuff names; evaluate on ADE20K-150 with its 150 names.
* ``coco-stuff171``: train and evaluate on the 171 COCO-Stuff classes (unsupervised setting).
* ``coco-stuff27``: train the 27 coarse classes with the fine names as words (hierarchy ``coco-stuff``); evaluate
  27-way with the fine ground truth mapped through ``FINE_TO_COARSE``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE = 255


@dataclass(frozen=True)
class ImageFreeProtocol:
    """Training classes (with an optional built-in hierarchy) and the evaluation classes and ground-truth map."""

    name: str
    train_classes: tuple[str, ...]
    hierarchy: str | None
    eval_dataset: str
    eval_classes: tuple[str, ...]
    gt_to_eval: tuple[int, ...]  # dataset ground-truth id -> index into eval_classes, or IGNORE

    def label_lookup(self) -> np.ndarray:
        """A 256-entry table mapping ground-truth ids (255 = ignore) to evaluation ids."""
        table = np.full(256, IGNORE, dtype=np.uint8)
        table[: len(self.gt_to_eval)] = self.gt_to_eval
        return table

    def classes_file(self) -> str:
        """The training classes as a ``--classes-file`` text."""
        return "".join(f"{name}\n" for name in self.train_classes)


def _protocols() -> dict[str, ImageFreeProtocol]:
    from vocabseg.data.classes import CLASSES, COARSE_27, FINE_TO_COARSE, ZERO_SHOT_SPLITS

    coco, ade = CLASSES["coco-stuff"], CLASSES["ade150"]
    unseen = ZERO_SHOT_SPLITS["coco-stuff"]["unseen"]
    position = {gt: i for i, gt in enumerate(unseen)}
    return {
        "coco-stuff-unseen15": ImageFreeProtocol(
            "coco-stuff-unseen15", tuple(coco[i] for i in unseen), None, "coco-stuff",
            tuple(coco[i] for i in unseen), tuple(position.get(i, IGNORE) for i in range(len(coco)))),
        "coco-to-ade150": ImageFreeProtocol("coco-to-ade150", coco, None, "ade150", ade, tuple(range(len(ade)))),
        "coco-stuff171": ImageFreeProtocol("coco-stuff171", coco, None, "coco-stuff", coco, tuple(range(len(coco)))),
        "coco-stuff27": ImageFreeProtocol("coco-stuff27", COARSE_27, "coco-stuff", "coco-stuff", COARSE_27,
                                          FINE_TO_COARSE),
    }


PROTOCOLS: dict[str, ImageFreeProtocol] = _protocols()


@dataclass(frozen=True)
class OFAProtocol:
    """What IFSeg's run scripts train OFA on, and the dataset (with the ``ifseg`` preset) it is evaluated on:
    ``labels`` and their category ``words`` in the official prompt order, and a built-in hierarchy of extra words."""

    name: str
    eval_dataset: str
    labels: tuple[str, ...]
    words: tuple[str, ...]
    hierarchy: str | None = None


def _ofa_protocols() -> dict[str, OFAProtocol]:
    from vocabseg.data.classes import CLASSES, COCO_UNSEEN_ORDER, query_names

    def listed(dataset: str, labels: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        names = dict(zip(CLASSES[dataset], query_names(dataset, "ifseg"), strict=True))
        return labels, tuple(names[label][0] for label in labels)

    return {
        "coco-stuff-unseen15": OFAProtocol("coco-stuff-unseen15", "coco-stuff-unseen15",
                                           *listed("coco-stuff", COCO_UNSEEN_ORDER)),
        "ade150": OFAProtocol("ade150", "ade150", *listed("ade150", CLASSES["ade150"])),
        "coco-stuff171": OFAProtocol("coco-stuff171", "coco-stuff", *listed("coco-stuff", CLASSES["coco-stuff"])),
        "coco-stuff27": OFAProtocol("coco-stuff27", "coco-stuff27", *listed("coco-stuff27", CLASSES["coco-stuff27"]),
                                    hierarchy="ifseg-coco27"),
    }


#: ``vocabseg train ifseg --protocol``: the official run scripts (coco_unseen.sh, ade.sh, coco_fine.sh; ade.sh trains
#: on the 150 ADE words) and the paper's hierarchical COCO-Stuff-27 setting (appendix A.1, Table 15).
OFA_PROTOCOLS: dict[str, OFAProtocol] = _ofa_protocols()
