"""Evaluation: bits/dim through the full bound, FID/IS, the offline digits metric, the report card.

Modules: ``bpd`` (eq. 5 over a data set, resumable), ``frechet`` (statistics, Frechet distance,
Inception Score), ``inception`` (torch-fidelity's TF-compatible Inception, hash-verified weights),
``fid`` (the FID/IS pipeline), ``digits_metric`` (the shipped digits classifier), ``report``.
"""

from ddpmkit.evaluate.bpd import evaluate_bpd, rate_distortion_table
from ddpmkit.evaluate.digits_metric import digits_fd
from ddpmkit.evaluate.fid import FewSamplesWarning, compute_fid, load_samples
from ddpmkit.evaluate.frechet import FeatureStats, classifier_score, frechet_distance, inception_score

__all__ = [
    "FeatureStats",
    "FewSamplesWarning",
    "classifier_score",
    "compute_fid",
    "digits_fd",
    "evaluate_bpd",
    "frechet_distance",
    "inception_score",
    "load_samples",
    "rate_distortion_table",
]
