"""Training through attnpack's methods: CLEAR distillation."""

from .clear import DistillResult, distill_clear, teacher_images

__all__ = ["DistillResult", "distill_clear", "teacher_images"]
