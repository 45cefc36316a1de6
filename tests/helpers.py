"""Helpers shared by the tests."""

import torch

from attnpack.pipelines import build_tiny_pipeline, tiny_call_kwargs

PROMPT = "a red fox in the snow"
DENOISERS = ("transformer", "transformer_2", "unet")


def tiny_pipeline(name: str, seed: int = 0):
    """A tiny pipeline by name, progress bars off."""
    pipe = build_tiny_pipeline(name, seed=seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_tiny(pipe, name: str, seed: int = 0, **overrides) -> torch.Tensor:
    """One fixed-seed call of a tiny pipeline; its first output."""
    kwargs = tiny_call_kwargs(name, **overrides)
    output = pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs)
    return output[0]


def denoisers(pipe) -> list[torch.nn.Module]:
    return [model for model in (getattr(pipe, attr, None) for attr in DENOISERS) if model is not None]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def record_calls(monkeypatch, module, name: str, record) -> list:
    """Wrap `module.name` for one test: every call still runs, and `record(*args, **kwargs)` is appended
    to the returned list first."""
    calls = []
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(record(*args, **kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls
