"""attnpack.kernels: attention ops in diffusers' (B, S, H, D) layout.

Each op lives in its own folder with a plain torch `reference.py` (the spec) and registers its backends
with `dispatch`: Triton on CUDA, the reference elsewhere. A call's `backend=`, else `set_backend` /
ATTNPACK_KERNEL_BACKEND, else "auto" chooses, the same way for every op; `backends()` reports what this
machine can run, `registry()` every op's backends.
"""

if __name__ == "kernels":
    # Python run from the repository root has this checkout first on sys.path, where this folder shadows
    # Hugging Face's `kernels` package (transformers installs it; diffusers imports it when present). That
    # import gets the installed package, found as if the checkout were not on sys.path, or the error of a
    # missing one; attnpack's ops are attnpack.kernels. (The import returns what sys.modules holds.)
    import importlib.machinery
    import importlib.util
    import sys
    from pathlib import Path

    _checkout = Path(__file__).resolve().parents[1]
    _elsewhere = [entry for entry in sys.path if Path(entry or ".").resolve() != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    _installed = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _installed
    _spec.loader.exec_module(_installed)
else:
    from .ops import (
        ENV_VAR,
        Backend,
        backends,
        best_match,
        block_sparse_attention,
        block_sparse_attention_backward,
        current_backend,
        dense_attention,
        global_local_attention,
        interpreting,
        local_window_attention,
        registry,
        set_backend,
        use_backend,
        windowed_attention,
    )

    __all__ = [
        "ENV_VAR",
        "Backend",
        "backends",
        "best_match",
        "block_sparse_attention",
        "block_sparse_attention_backward",
        "current_backend",
        "dense_attention",
        "global_local_attention",
        "interpreting",
        "local_window_attention",
        "registry",
        "set_backend",
        "use_backend",
        "windowed_attention",
    ]
