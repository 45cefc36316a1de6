"""Training through attnpack's methods (CLEAR distillation) and the toy models: the procedural world they
learn from, their configs, their training and their loading."""

from .clear import DistillResult, distill_clear, teacher_images
from .toy import RECIPES, ToyRecipe, ToyTrainingResult, train_toy
from .toy_models import (
    TOY_GEOMETRY,
    TOY_METHODS,
    build_toy_image,
    build_toy_video,
    load_toy,
    shipped_path,
    toy_shipped,
)

__all__ = [
    "RECIPES",
    "TOY_GEOMETRY",
    "TOY_METHODS",
    "DistillResult",
    "ToyRecipe",
    "ToyTrainingResult",
    "build_toy_image",
    "build_toy_video",
    "distill_clear",
    "load_toy",
    "shipped_path",
    "teacher_images",
    "toy_shipped",
    "train_toy",
]
