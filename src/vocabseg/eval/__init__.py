"""Evaluation: confusion-matrix metrics and the (sharded, resumable) benchmark runner."""

from vocabseg.eval.metrics import ConfusionMatrix, Metrics, compute_metrics
from vocabseg.eval.runner import EvalResult, evaluate

__all__ = ["ConfusionMatrix", "EvalResult", "Metrics", "compute_metrics", "evaluate"]
