"""AttnContext: what an attention processor may know about the denoising run it is part of.

`attnpack.attach(pipe)` installs two light hooks that keep it current:

- a forward pre-hook on each denoiser (transformer, transformer_2, unet) reads the timestep, the latent
  grid (as a token grid after patch embedding) and the text length of every forward call;
- the scheduler's `set_timesteps` / `set_begin_index` / `step` are wrapped to count denoising steps, so a
  step means the same thing for every pipeline: classifier-free guidance that runs the denoiser twice per
  step (Wan, true-CFG FLUX) and guidance batched into one call (Stable Diffusion) both count once.

Processors read the context through the attention module's site (see `AttentionSite`), never globals.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from .fallback import ForwardCoverage
from .layout import Role

if TYPE_CHECKING:
    from .families.base import Adapter, Family

State = TypeVar("State")


class AttnContext:
    """The state of the denoising run, shared by every attention layer of one attached pipeline.

    Attributes:
        step_index: denoising steps taken so far in this run (0 during the first step), or None when the
            denoiser runs outside a scheduler loop (see `set_step`).
        num_steps: length of the scheduler's timestep schedule, or None.
        timestep: the `timestep` the denoiser was last called with (a tensor, as passed: no device sync).
        grid: token grid of the last denoiser input after patch embedding: (H, W) for images, (F, H, W)
            for videos. UNet layers at lower resolutions derive their own grid from it.
        text_len: text tokens of the last denoiser call.
        text_mask: (B, text_len) bool, the real text tokens, for families that pad the text (HunyuanVideo).
        text_parts: lengths of the prompts the last denoiser call's text joins, where a pipeline feeds
            several at once (`trajectory_video`: (background, foreground)); None for one prompt. Reset at
            every denoiser call, before the pipeline's own hooks run.
        batch_size: batch of the last denoiser call.
        denoiser: attribute name of the denoiser that ran last ("transformer", "transformer_2", "unet").
        site: the attention layer being computed right now (set by attnpack processors).
    """

    def __init__(self):
        self.step_index: int | None = None
        self.num_steps: int | None = None
        self.timestep: torch.Tensor | float | None = None
        self.grid: tuple[int, ...] | None = None
        self.text_len: int | None = None
        self.text_mask: torch.Tensor | None = None
        self.text_parts: tuple[int, ...] | None = None
        self.batch_size: int | None = None
        self.denoiser: str | None = None
        self.site: AttentionSite | None = None
        self.sites: list[AttentionSite] = []
        self.memo: dict[str, Any] = {}  # small caches of families and methods, e.g. a grid read off ids
        self.coverage = ForwardCoverage()  # which layers of the current denoiser call fell back to dense
        self._manual_steps = False
        # Run state of the methods on this pipeline, by method object (see `state_for`).
        self._states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @property
    def layer_index(self) -> int | None:
        """Index of the current attention layer among its denoiser's attention layers, in forward order."""
        return None if self.site is None else self.site.index

    @property
    def step_fraction(self) -> float | None:
        """How far the run is, in [0, 1): step_index / num_steps."""
        if self.step_index is None or not self.num_steps:
            return None
        return self.step_index / self.num_steps

    def set_step(self, step_index: int, num_steps: int) -> None:
        """Set the step by hand, for a denoising loop that does not go through a diffusers scheduler.

        From then on the scheduler hooks leave the step alone.
        """
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"set_step: num_steps={num_steps!r} must be an integer >= 1")
        if not isinstance(step_index, int) or not 0 <= step_index < num_steps:
            raise ValueError(f"set_step: step_index={step_index!r} must be an integer in [0, {num_steps})")
        self.step_index, self.num_steps, self._manual_steps = step_index, num_steps, True

    def state_for(self, owner: Any, make: Callable[[], State]) -> State:
        """The run state `owner` (a method object) keeps for this pipeline, made by `make()` the first time.
        A method's settings stay on the method; what a run finds (per-step draws, masks) lives here, so one
        method object applied to two pipelines keeps two states."""
        state = self._states.get(owner)
        if state is None:
            state = self._states[owner] = make()
        return state

    def count_of(self, role: Role) -> int:
        """How many attached attention layers have this role (e.g. 70 self-attention layers in SDXL)."""
        return sum(site.role is role for site in self.sites)

    def __repr__(self) -> str:
        return (
            f"AttnContext(step={self.step_index}/{self.num_steps}, grid={self.grid}, "
            f"text_len={self.text_len}, batch={self.batch_size}, denoiser={self.denoiser!r})"
        )


@dataclass(eq=False)
class AttentionSite:
    """One attention module of an attached denoiser: its family adapter, role and position."""

    name: str  # module path inside the pipeline, e.g. "transformer.transformer_blocks.0.attn"
    local_name: str  # module path inside its denoiser, e.g. "transformer_blocks.0.attn"
    denoiser: str  # attribute of the denoiser in the pipeline: "transformer", "transformer_2", "unet"
    family: Family
    adapter: Adapter
    role: Role
    index: int  # among this denoiser's supported attention modules, in forward order
    role_index: int  # among those with the same role
    context: AttnContext | None
    stock_processor: Any = field(repr=False)  # the processor the module had when it was attached
    model: Any = field(default=None, repr=False)  # weakref to the denoiser: its context-parallel config

    @property
    def denoiser_model(self) -> torch.nn.Module | None:
        return None if self.model is None else self.model()


SITE_ATTR = "_attnpack_site"


def site_of(module: torch.nn.Module) -> AttentionSite | None:
    return getattr(module, SITE_ATTR, None)


def forward_arguments(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A forward call's arguments by parameter name."""
    names = _parameter_names(type(module))
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    return bound


_PARAMETER_NAMES: dict[type, list[str]] = {}


def _parameter_names(cls: type) -> list[str]:
    if cls not in _PARAMETER_NAMES:
        parameters = list(inspect.signature(cls.forward).parameters.values())[1:]  # drop self
        _PARAMETER_NAMES[cls] = [
            p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    return _PARAMETER_NAMES[cls]


class DenoiserHook:
    """Forward pre-hook on a denoiser: records the call's inputs in the context."""

    def __init__(self, context: AttnContext, family: Family, denoiser_name: str, steps: StepCounter | None):
        self.context = context
        self.family = family
        self.denoiser_name = denoiser_name
        self.steps = steps

    def __call__(self, module, args, kwargs):
        ctx = self.context
        inputs = forward_arguments(module, args, kwargs)
        ctx.denoiser = self.denoiser_name
        ctx.timestep = inputs.get("timestep")
        ctx.text_parts = None  # a pipeline hook that joins prompts sets it after this hook
        self.family.read_inputs(module, inputs, ctx)
        self.family.check_parallel(module, ctx)
        if self.steps is not None and not ctx._manual_steps:
            self.steps.refresh()
        return None


class StepCounter:
    """Counts scheduler steps of a pipeline's denoising loop into its context.

    Wraps the scheduler's methods on the instance (the class is untouched) and follows the pipeline
    when its scheduler is replaced: `pipe.scheduler = DPMSolverMultistepScheduler.from_config(...)`.
    """

    WRAPPED = ("set_timesteps", "set_begin_index", "step")

    def __init__(self, pipe, context: AttnContext):
        self._pipe = weakref.ref(pipe)
        self.context = context
        self.scheduler = None
        self._saved: dict[str, Any] = {}

    def refresh(self) -> None:
        """Called before each denoiser forward: make sure the pipeline's current scheduler is counted."""
        pipe = self._pipe()
        scheduler = getattr(pipe, "scheduler", None) if pipe is not None else None
        if scheduler is self.scheduler:
            return
        self.unwrap()
        if scheduler is None:
            return
        self.wrap(scheduler)
        # Wrapped mid-run (the scheduler was swapped after `attach`): its own state says where we are.
        ctx = self.context
        ctx.step_index = _scheduler_position(scheduler)
        ctx.num_steps = _schedule_length(scheduler)

    def wrap(self, scheduler) -> None:
        ctx = self.context
        self.scheduler = scheduler
        for name in self.WRAPPED:
            if not hasattr(scheduler, name):
                continue
            self._saved[name] = scheduler.__dict__.get(name, _MISSING)
            original = getattr(scheduler, name)
            setattr(scheduler, name, _counting(name, original, scheduler, ctx))

    def unwrap(self) -> None:
        scheduler, self.scheduler = self.scheduler, None
        for name, saved in self._saved.items():
            if saved is _MISSING:
                scheduler.__dict__.pop(name, None)
            else:
                setattr(scheduler, name, saved)
        self._saved = {}


_MISSING = object()


def _counting(name: str, original, scheduler, ctx: AttnContext):
    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        if not ctx._manual_steps:
            if name == "set_timesteps":
                ctx.step_index, ctx.num_steps = 0, _schedule_length(scheduler)
            elif name == "set_begin_index":
                ctx.step_index = _scheduler_position(scheduler)
            elif ctx.step_index is not None:
                ctx.step_index += 1
        return result

    wrapper.__wrapped__ = original
    return wrapper


def _schedule_length(scheduler) -> int | None:
    timesteps = getattr(scheduler, "timesteps", None)
    return None if timesteps is None else len(timesteps)


def _scheduler_position(scheduler) -> int:
    for attribute in ("step_index", "begin_index"):
        value = getattr(scheduler, attribute, None)
        if isinstance(value, int):
            return value
    return 0
