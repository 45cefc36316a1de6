"""Which backend the kernel ops run on: `set_backend(...)`, else ATTNPACK_KERNEL_BACKEND, else auto.

The names live in `dispatch` (the registry every op registers with); this module keeps them importable
where they always were."""

from __future__ import annotations

from .dispatch import ENV_VAR, current_backend, set_backend, use_backend

__all__ = ["ENV_VAR", "current_backend", "set_backend", "use_backend"]
