"""attnpack.eval: what an attention swap cost in quality. Metrics (`attnpack.eval.metrics`), evaluation
runs with JSON + HTML reports (`attnpack.eval.report`), the procedural world's shapes found in pictures
(`attnpack.eval.shapes`) and every method measured on the toy models (`attnpack.eval.toy`); `attnpack eval`
on the command line."""

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
from .shapes import Detection, background_colour, detect_objects, object_finder, scene_adherence
from .toy import measure_adherence, quality_tables, toy_quality, write_quality

__all__ = [
    "CLIP_MODEL",
    "DINO_MODEL",
    "Detection",
    "MetricModelUnavailable",
    "background_colour",
    "box_iou",
    "clip_score",
    "colour_box_finder",
    "detect_objects",
    "dynamic_degree",
    "evaluate_manifest",
    "flicker",
    "lpips",
    "measure_adherence",
    "motion_smoothness",
    "object_finder",
    "optical_flow",
    "psnr",
    "quality_tables",
    "read_output",
    "reference_similarity",
    "run_batch",
    "scene_adherence",
    "score",
    "ssim",
    "subject_consistency",
    "subject_similarity",
    "toy_quality",
    "trajectory_adherence",
    "write_quality",
    "write_report",
]
