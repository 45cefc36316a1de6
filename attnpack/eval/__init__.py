"""attnpack.eval: what an attention swap cost in quality. Metrics (`attnpack.eval.metrics`) and evaluation
runs with JSON + HTML reports (`attnpack.eval.report`); `attnpack eval` on the command line."""

from .metrics import (
    CLIP_MODEL,
    DINO_MODEL,
    MetricModelUnavailable,
    box_iou,
    clip_score,
    colour_box_finder,
    dynamic_degree,
    flicker,
    lpips,
    motion_smoothness,
    optical_flow,
    psnr,
    reference_similarity,
    ssim,
    subject_consistency,
    subject_similarity,
    trajectory_adherence,
)
from .report import evaluate_manifest, read_output, run_batch, score, write_report

__all__ = [
    "CLIP_MODEL",
    "DINO_MODEL",
    "MetricModelUnavailable",
    "box_iou",
    "clip_score",
    "colour_box_finder",
    "dynamic_degree",
    "evaluate_manifest",
    "flicker",
    "lpips",
    "motion_smoothness",
    "optical_flow",
    "psnr",
    "read_output",
    "reference_similarity",
    "run_batch",
    "score",
    "ssim",
    "subject_consistency",
    "subject_similarity",
    "trajectory_adherence",
    "write_report",
]
