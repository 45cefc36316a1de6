"""attnpack.pipelines: ready pipelines: CLEAR's upscaler, long videos (FreeNoise / FreeLong), and tiny
random-weight pipelines (smoke models)."""

from .clear import clear_upscale
from .generate import Cancelled, Generation, generate, save, side_by_side
from .long_video import frame_embeddings, keyframe_prompts, lerp_prompts, long_video
from .multi_subject import MultiSubjectOutput, load_subjects, multi_subject, reference_sheet
from .presets import PRESETS, ModelUnavailable, Preset, get_preset, load_preset
from .tiny import RANDOM_WEIGHTS_NOTE, TINY_PIPELINES, TinyPipeline, build_tiny_pipeline, tiny_call_kwargs
from .trajectory import TrajectoryOutput, parse_split, split_prompt, trajectory_video

__all__ = [
    "PRESETS",
    "RANDOM_WEIGHTS_NOTE",
    "TINY_PIPELINES",
    "Cancelled",
    "Generation",
    "ModelUnavailable",
    "MultiSubjectOutput",
    "Preset",
    "TinyPipeline",
    "TrajectoryOutput",
    "build_tiny_pipeline",
    "clear_upscale",
    "frame_embeddings",
    "generate",
    "get_preset",
    "keyframe_prompts",
    "lerp_prompts",
    "load_preset",
    "load_subjects",
    "long_video",
    "multi_subject",
    "parse_split",
    "reference_sheet",
    "save",
    "side_by_side",
    "split_prompt",
    "tiny_call_kwargs",
    "trajectory_video",
]
