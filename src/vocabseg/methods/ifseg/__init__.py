"""Image-free segmentation (IFSeg, Yun et al. 2023): artificial word maps, kNN smoothing, training.

* The paper's model (method ``ifseg``): :mod:`.ofa` (prompt, category embeddings, segmentation pass,
  label maps) and :mod:`.ofa_train` (the official image-free recipe) on OFA
  (:mod:`vocabseg.models.ofa`).
* This library's CLIP variant (method ``ifseg-clip``): :mod:`.head` and :mod:`.train`.
* Shared: :mod:`.sampler` (word sets, hierarchies, nearest upsampling), :mod:`.knn`, :mod:`.protocols`.
"""
