"""attnpack.pipelines: ready pipelines: CLEAR's upscaler, and tiny random-weight pipelines (smoke models)."""

from .clear import clear_upscale
from .tiny import RANDOM_WEIGHTS_NOTE, TINY_PIPELINES, TinyPipeline, build_tiny_pipeline, tiny_call_kwargs

__all__ = [
    "RANDOM_WEIGHTS_NOTE",
    "TINY_PIPELINES",
    "TinyPipeline",
    "build_tiny_pipeline",
    "clear_upscale",
    "tiny_call_kwargs",
]
