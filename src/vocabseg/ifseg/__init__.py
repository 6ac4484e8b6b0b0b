"""Image-free segmentation (IFSeg, Yun et al. 2023): artificial word maps, kNN smoothing, training.

* The paper's model (method ``ifseg``): :mod:`vocabseg.ifseg.ofa` (prompt, category embeddings, segmentation pass,
  label maps) and :mod:`vocabseg.ifseg.ofa_train` (the official image-free recipe) on OFA
  (:mod:`vocabseg.models.ofa`).
* This library's CLIP variant (method ``ifseg-clip``): :mod:`vocabseg.ifseg.model` and :mod:`vocabseg.ifseg.train`.
* Shared: :mod:`.sampler` (word sets, hierarchies, nearest upsampling), :mod:`.knn`, :mod:`.protocols`.
"""
