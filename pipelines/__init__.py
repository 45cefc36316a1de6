"""attnpack.pipelines: ready pipelines. For now the tiny random-weight pipelines (smoke models)."""

from .tiny import RANDOM_WEIGHTS_NOTE, TINY_PIPELINES, TinyPipeline, build_tiny_pipeline, tiny_call_kwargs

__all__ = ["RANDOM_WEIGHTS_NOTE", "TINY_PIPELINES", "TinyPipeline", "build_tiny_pipeline", "tiny_call_kwargs"]
