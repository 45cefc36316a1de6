"""What a model family provides: its attention sites, its denoiser inputs, and an adapter per processor.

An adapter turns one call of a diffusers attention module into canonical `(q, k, v)` in `(B, S, H, D)`
plus a `TokenLayout` (`project`), and the attention output back into what the module's stock processor
returns (`finish`). Between the two, the stock processor would call SDPA; an attnpack method runs its own
attention instead. With dense attention in between, project + finish reproduce the stock processor.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..layout import Role, TokenLayout

if TYPE_CHECKING:
    from ..context import AttentionSite, AttnContext


@dataclass(eq=False)
class AttnCall:
    """One attention call in canonical form.

    `attn_mask` is in SDPA's convention, broadcastable to (B, H, Sq, Sk): boolean (True = may attend) or
    additive. `extra_context` holds further (key, value) sets that the same queries attend to separately,
    the outputs being added (Wan I2V's image context).
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    layout: TokenLayout
    module: torch.nn.Module
    site: AttentionSite | None
    context: AttnContext | None
    attn_mask: torch.Tensor | None = None
    scale: float | None = None
    extra_context: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)  # what the adapter's finish() needs
    prepared: Any = None  # what the method's before_projection() made of the inputs (token merging, ...)
    head_start: int = 0  # the module's index of query head 0 (Ulysses hands each rank a group of heads)


@dataclass(frozen=True, eq=False)
class ParallelLayout:
    """How one call's sequence lies over the ranks of diffusers' context parallelism.

    `layout` is the call's layout over the whole sequence, in the family's own token order (what one GPU
    sees). Each rank holds 1 / N of every stream, streams in order: FLUX's queries are the streams
    (text, image), so a rank holds [text_r, image_r]. `kv_streams` is the same for the keys, or None when
    every rank holds all the keys (Wan's cross-attention to the text). `key_padding` (B, Sk) bool marks the
    real keys of the whole sequence, where the family pads them (HunyuanVideo's text).
    """

    layout: TokenLayout
    q_streams: tuple[int, ...]
    kv_streams: tuple[int, ...] | None
    key_padding: torch.Tensor | None = None


class Adapter(ABC):
    """Canonical q, k, v for one attention module class and its stock processor."""

    name: str = ""
    stock_processors: tuple[type, ...] = ()

    @abstractmethod
    def project(
        self,
        attn: torch.nn.Module,
        site: AttentionSite | None,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        rotary_emb: Any,
        temb: torch.Tensor | None,
    ) -> AttnCall:
        """Canonical q, k, v (B, S, H, D), layout and mask for one call of the module."""

    @abstractmethod
    def finish(self, call: AttnCall, out: torch.Tensor, extra_out: list[torch.Tensor]) -> Any:
        """`out` is (B, Sq, H, D); `extra_out` holds one output per `call.extra_context` entry."""

    def reproduces(self, processor: Any) -> bool:
        """Whether this adapter computes what `processor` does: exactly its stock classes, not subclasses,
        which may change anything. None stands for an attnpack method, which runs through this adapter."""
        return processor is None or type(processor) in self.stock_processors

    def default_processor(self) -> Any:
        """A fresh stock processor, for a module that already had an attnpack method when it was attached."""
        return self.stock_processors[0]()

    def leading_text_len(self, site: AttentionSite, encoder_hidden_states: torch.Tensor | None) -> int:
        """Text tokens at the start of the module's `hidden_states` (before projection): 0 where the text
        comes separately or not at all."""
        return 0


class Family(ABC):
    """A family of diffusers denoisers that share attention modules and input conventions."""

    name: str = ""
    title: str = ""  # for people: "FLUX", "Stable Diffusion UNets (SD 1.5, SD 2.x, SDXL, AnimateDiff)"
    denoiser_classes: tuple[str, ...] = ()  # diffusers class names
    # Whether attnpack runs under diffusers' context parallelism on this family, and why not where not.
    context_parallel: bool = False
    context_parallel_note: str = "diffusers' own processors of this family do not support context parallelism"

    def matches(self, model: torch.nn.Module) -> bool:
        names = {cls.__name__ for cls in type(model).__mro__}
        return any(name in names for name in self.denoiser_classes)

    @abstractmethod
    def classify(self, name: str, module: torch.nn.Module, processor: Any) -> tuple[Adapter, Role] | None:
        """The adapter and role for one attention module, or None when attnpack cannot reproduce it.

        `processor` is the module's processor, or None when that is an attnpack method (which stands in
        for the stock processor).
        """

    def forward_order(self, name: str) -> tuple:
        """Sort key that puts attention modules in the order the forward pass runs them."""
        return ()

    @abstractmethod
    def read_inputs(self, model: torch.nn.Module, inputs: dict[str, Any], ctx: AttnContext) -> None:
        """Fill the context from one denoiser forward call's arguments."""

    def parallel_layout(self, call: AttnCall) -> ParallelLayout | None:
        """Under context parallelism: how the call's tokens lie over the ranks, read from the context (which
        saw the inputs before diffusers split them); None for a layer that runs before the split."""
        raise NotImplementedError(f"{type(self).__name__} does not read context-parallel layouts")

    def context_parallel_plan(self, model: torch.nn.Module) -> dict | None:
        """The `cp_plan` that splits this denoiser's inputs: diffusers' own (`_cp_plan`) where it has one."""
        return getattr(model, "_cp_plan", None)

    def check_parallel(self, model: torch.nn.Module, ctx: AttnContext) -> None:
        """Raise where this denoiser runs under context parallelism in a way that would give a wrong result."""
        return None  # most families: diffusers' plan and attnpack's processors are all there is

    # Where the deeper half of the model's attention layers starts, as a `role_index` among its self / joint
    # attention layers (SDXL: 36 of 70; FLUX: its single-stream blocks, from 19): methods that act on the
    # later, more semantic layers by default start there. None: the family does not say.
    deep_layers_start: int | None = None

    def downsample_factor(self, model: torch.nn.Module, name: str) -> int | None:
        """How many times smaller than the latent token grid the attention module `name` works (UNets' lower
        levels); None where the family does not say (transformers attend at one resolution)."""
        return None

    def rotary(self, model: torch.nn.Module) -> Rotary | None:
        """The denoiser's rotary position embedding, for methods that change it; None without one."""
        return None

    def watch_block_inputs(
        self,
        model: torch.nn.Module,
        modules: list[torch.nn.Module],
        seen: Callable[[torch.nn.Module, Any], None],
    ) -> Undo:
        """Call `seen(module, hidden_states)` with the input of the transformer block around each of these
        attention modules, every time the block runs (before its norm): what token merging matches on."""
        raise ValueError(f"{self.title}: its attention modules' transformer blocks cannot be watched")

    def temporal_blocks(self, model: torch.nn.Module) -> TemporalBlocks | None:
        """The denoiser's temporal (frame) transformer blocks, for methods that run them per window of
        frames; None where it has none."""
        return None

    def attention_modules(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
        """Every module that holds an attention processor, in forward order."""
        found = [(name, module) for name, module in model.named_modules() if hasattr(module, "set_processor")]
        # sorted() is stable: modules the family does not order keep their registration order.
        return iter(sorted(found, key=lambda item: self.forward_order(item[0])))


Undo = Callable[[], None]


class Rotary:
    """A denoiser's rotary position embedding, as methods may change it while they are applied. Every
    change returns the callable that undoes it. A family offers what its embedding allows; the rest raises."""

    def __init__(self, family: Family, model: torch.nn.Module):
        self.family, self.model = family, model

    def reindex(self, source_index: Callable[[], torch.Tensor | None]) -> Undo:
        """Re-index the tables' video-token rows at every forward: token t takes the position of token
        `source_index()[t]` (a (S,) index over the video tokens); `source_index()` None leaves them alone."""
        raise ValueError(f"{self.family.title}: its rotary tables cannot be re-indexed by video token")

    def scale_theta(self, factor: float) -> Undo:
        """Multiply the embedding's base (theta) by `factor` (NTK-aware RoPE)."""
        raise ValueError(f"{self.family.title}: its rotary embedding has no base (theta) to scale")


class RotaryModule(Rotary):
    """A rotary module whose forward returns the tables of the video tokens (Wan's and HunyuanVideo's `rope`):
    re-indexed through a forward hook on it."""

    def __init__(self, family: Family, model: torch.nn.Module, module: torch.nn.Module):
        super().__init__(family, model)
        self.module = module

    def reindex(self, source_index: Callable[[], torch.Tensor | None]) -> Undo:
        from .. import parallel  # parallel imports this module

        model = self.model

        def hook(module, args, output):
            source = source_index()
            if source is None:
                return None
            config = parallel.context_parallel_config(model)
            if getattr(config, "context_parallel_config", None) is None:
                return reindex_tables(output, source)
            # diffusers' plan has cut the tables to this rank's rows; re-indexing reads any row, so
            # compute the whole tables again (the class's forward, outside the plan's hooks).
            return reindex_tables(type(module).forward(module, *args), source, config)

        return self.module.register_forward_hook(hook).remove


class RotaryArgument(Rotary):
    """Rotary tables the pipeline passes to the denoiser's forward (CogVideoX's `image_rotary_emb`):
    re-indexed through a forward pre-hook on the denoiser."""

    def __init__(self, family: Family, model: torch.nn.Module, argument: str):
        super().__init__(family, model)
        self.argument = argument

    def reindex(self, source_index: Callable[[], torch.Tensor | None]) -> Undo:
        def hook(module, args, kwargs):
            tables = kwargs.get(self.argument)
            source = None if tables is None else source_index()
            if source is None:
                return None
            return args, kwargs | {self.argument: reindex_tables(tables, source)}

        return self.model.register_forward_pre_hook(hook, with_kwargs=True).remove


class RotaryTheta(Rotary):
    """A rotary module that computes its tables from `theta` at every forward (FLUX's `pos_embed`): its base
    can be scaled; its tables hold text rows too, so they are not re-indexed by video token."""

    def __init__(self, family: Family, model: torch.nn.Module, module: torch.nn.Module):
        super().__init__(family, model)
        self.module = module

    def scale_theta(self, factor: float) -> Undo:
        module, theta = self.module, self.module.theta
        module.theta = theta * factor

        def restore():
            module.theta = theta

        return restore


def reindex_tables(tables: Any, source: torch.Tensor, config=None) -> Any:
    """Rotary tables (a tensor or a tuple such as (cos, sin)) with their video-token rows gathered by
    `source` (S,), along the axis of S tokens; under context parallelism (`config`) this rank's rows."""
    from .. import parallel

    tokens = source.numel()

    def gather(table: torch.Tensor) -> torch.Tensor:
        axis = next((d for d, n in enumerate(table.shape) if n == tokens), None)
        if axis is None:
            raise ValueError(
                f"a rotary table of shape {tuple(table.shape)} has no axis of the {tokens} video tokens to "
                "re-index"
            )
        table = table.index_select(axis, source.to(table.device))
        return table if config is None else parallel.local_shard(table, axis, config)

    return tuple(gather(t) for t in tables) if isinstance(tables, tuple | list) else gather(tables)


# On a temporal attention module whose block's frame positions were deferred (`TemporalBlocks.defer_positions`):
# the (1, max_frames, C) table the processor adds itself.
POSITIONS_ATTR = "_attnpack_positions"


class TemporalBlocks:
    """A denoiser's temporal transformer blocks (AnimateDiff's motion modules), as the temporal-window
    methods use them. Every change returns its undo."""

    def __init__(self, family: Family, model: torch.nn.Module):
        self.family, self.model = family, model

    def defer_positions(self, modules: list[torch.nn.Module]) -> Undo:
        """Stop the blocks of these temporal attention modules adding frame positions and put each block's
        position table on its modules (`POSITIONS_ATTR`), for the processor to add."""
        raise ValueError(f"{self.family.title}: its temporal blocks have no frame positions to defer")

    def fuse_windows(
        self,
        modules: list[torch.nn.Module],
        windows: Callable[[int, int | None], list[tuple[int, int]]],
        weights: Callable[[int], torch.Tensor],
    ) -> Undo:
        """Run the blocks of these temporal attention modules per window of frames, fusing the windows
        before the feed-forward: `windows(frames, trained_frames)` gives the (start, end) windows
        (`trained_frames`: the block's position table length, or None), `weights(length)` each frame's
        weight in a window."""
        raise ValueError(f"{self.family.title}: its temporal blocks cannot be run per window of frames")


def context_grid(ctx: AttnContext | None, visual_len: int) -> tuple[int, ...] | None:
    """The context's token grid when it holds exactly the call's `visual_len` tokens; None when the call
    carries other tokens (e.g. FLUX Kontext's reference image) or nothing was attached."""
    grid = ctx.grid if ctx is not None else None
    return grid if grid is not None and math.prod(grid) == visual_len else None


def record_inputs(ctx: AttnContext, grid: tuple[int, ...], batch_size: int, encoder_hidden_states) -> None:
    """What every family's read_inputs records: token grid, batch, text length."""
    ctx.grid, ctx.batch_size = grid, batch_size
    ctx.text_len = None if encoder_hidden_states is None else encoder_hidden_states.shape[1]


def sdpa_mask(
    attention_mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor
) -> torch.Tensor | None:
    """A (B, Sk) key mask as (B, 1, 1, Sk), the way diffusers' dispatch_attention_fn reads one."""
    if (
        attention_mask is not None
        and attention_mask.ndim == 2
        and attention_mask.shape[0] == query.shape[0]
        and attention_mask.shape[1] == key.shape[1]
    ):
        return attention_mask[:, None, None, :]
    return attention_mask


def processor_of(module: torch.nn.Module) -> Any:
    return getattr(module, "processor", None)


def unflatten_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, S, H * D) -> (B, S, H, D)."""
    return x.unflatten(-1, (heads, -1))


def project_context_heads(attn: torch.nn.Module, context: torch.Tensor):
    """q, k, v (B, S, H, D) of the text stream through `add_*_proj` and the added q/k norms."""
    query, key, value = attn.add_q_proj(context), attn.add_k_proj(context), attn.add_v_proj(context)
    query, key, value = (unflatten_heads(x, attn.heads) for x in (query, key, value))
    if attn.norm_added_q is not None:
        query = attn.norm_added_q(query)
    if attn.norm_added_k is not None:
        key = attn.norm_added_k(key)
    return query, key, value


def project_heads(attn: torch.nn.Module, hidden_states: torch.Tensor, context: torch.Tensor):
    """q, k, v in (B, S, H, D) through diffusers' `Attention` projections and per-head q/k norms."""
    query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    query, key, value = (unflatten_heads(x, attn.heads) for x in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value
