"""The base every attnpack method builds on: a validated config that is also a diffusers attention processor."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .. import parallel
from ..context import SITE_ATTR
from ..families import ADAPTERS_BY_MODULE
from ..families.base import AttnCall, processor_of
from ..kernels import block_sparse_attention, dense_attention
from ..layout import Role
from ..patterns.block_sparse import BlockSparsePattern
from .needs import Needs

ATTACH_HINT = "call attnpack.attach(pipe) before pipe.transformer / pipe.unet .set_attn_processor(...)"


@dataclass(frozen=True, eq=False)
class SparseAttention:
    """A call's attention as one masked softmax: `pattern` over the call's queries and keys (None: every
    pair), the scale, and a (B, Sk) key-padding mask. What ring attention needs to split it into key chunks."""

    pattern: BlockSparsePattern | None = None
    scale: float | None = None
    key_padding: torch.Tensor | None = None


class AttentionMethod:
    """An attention method. Subclasses are dataclasses of their settings and implement `attend`.

    An instance is a diffusers attention processor for every supported family: `attnpack.apply(pipe,
    method)` installs it where its families and roles match, or, after `attnpack.attach(pipe)`,
    `pipe.transformer.set_attn_processor(method)` installs it everywhere (layers the method does not act on
    then run dense attention through the same path, which reproduces the stock processor).
    """

    name: ClassVar[str] = ""
    families: ClassVar[tuple[str, ...]] = ()  # family names the method acts on
    roles: ClassVar[frozenset[Role]] = frozenset()  # layer roles it acts on
    family_roles: ClassVar[dict[str, frozenset[Role]]] = {}  # where a family's roles differ from `roles`
    needs_context: ClassVar[bool] = False  # needs attnpack.attach (grids, steps, text spans)
    needs: ClassVar[Needs] = Needs()  # how generations run it, what users give in widgets of their own
    # Under diffusers' context parallelism: "ulysses" (heads split, every token per rank) and / or "ring"
    # (sequence split; needs `sparse_attention`), and for what is missing, why.
    context_parallel: ClassVar[frozenset[str]] = frozenset()
    context_parallel_note: ClassVar[str] = ""
    _parallel_config = None  # diffusers' enable_parallelism sets it on processors that declare it
    _attention_backend = None  # diffusers' set_attention_backend sets it likewise; dense parts run on it

    # The union of the families' processor signatures. diffusers' `Attention` forwards only keyword
    # arguments this signature names, so every one a family passes is spelled out. FLUX and Wan pass the
    # rotary embedding positionally as the fifth argument; it lands in `image_rotary_emb` either way.
    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        temb: torch.Tensor | None = None,
        rotary_emb: Any = None,
        **kwargs: Any,
    ):
        site = getattr(attn, SITE_ATTR, None)
        if site is not None:
            adapter, ctx = site.adapter, site.context
            ctx.site = site
        else:
            adapter, ctx = ADAPTERS_BY_MODULE.get(type(attn).__name__), None
            if adapter is None:
                raise RuntimeError(
                    f"{type(self).__name__} is running on a {type(attn).__name__} module that attnpack has not "
                    f"attached, so it cannot tell which model family the module belongs to: {ATTACH_HINT}"
                )
        if self.needs_context and ctx is None:
            raise RuntimeError(
                f"{type(self).__name__} needs the denoising context (grids, steps): {ATTACH_HINT}"
            )
        config = parallel.context_parallel_config(site.denoiser_model if site is not None else None, self)
        if config is not None and site is None:
            raise RuntimeError(
                f"{type(self).__name__} runs under {parallel.describe(config)}, which needs the token layout "
                f"before diffusers splits it: {ATTACH_HINT}"
            )
        if config is not None:
            parallel.check_supported(self, site.family, site.role, config)
        rotary = image_rotary_emb if image_rotary_emb is not None else rotary_emb
        prepared = None
        if site is not None and self.acts_on(site.family.name, site.role):
            hidden_states, encoder_hidden_states, prepared = self.before_projection(
                attn, site, hidden_states, encoder_hidden_states, attention_mask
            )
        call = adapter.project(attn, site, hidden_states, encoder_hidden_states, attention_mask, rotary, temb)
        call.prepared = prepared
        family = site.family.name if site is not None else adapter.name
        if config is not None:
            out = parallel.attend(self, call, config)
        elif self.acts_on(family, call.layout.role):
            if ctx is not None:
                ctx.coverage.act(self)
            out = self.attend(call)
        else:
            out = dense(call)
        extra_out = [self.attend_context(call, key, value) for key, value in call.extra_context]
        result = adapter.finish(call, out, extra_out)
        return result if prepared is None else self.after_output(prepared, result)

    def attend(self, call: AttnCall) -> torch.Tensor:
        """Attention for one call: (B, Sq, H, D) from `call.query`, `call.key`, `call.value`."""
        raise NotImplementedError(f"{type(self).__name__} must implement attend()")

    def sparse_attention(self, call: AttnCall) -> SparseAttention | None:
        """The call's attention as one masked softmax, or None where the method's attention is something
        else (a blend, two softmaxes): such methods run on one GPU or under Ulysses, not on sequence shards.
        Reads only the call's layout, shapes, device and context, never the values."""
        return None

    def extra_keys(self, call: AttnCall) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keys and values the method adds after the call's own (CLEAR's pooled tokens), or None. Under
        ring attention it runs on what one rank holds (`call.layout` is the rank's shard), and the extra
        keys of all ranks, in rank order, must be the extra keys of the whole sequence."""
        return None

    @classmethod
    def acts_on(cls, family: str, role: Role) -> bool:
        """Whether the method acts on layers of this role in this family."""
        return family in cls.families and role in cls.family_roles.get(family, cls.roles)

    def idle_reason(self, site) -> str | None:
        """Why the method would run plain dense attention on every call of this layer of a family and role it
        acts on (AgentSD below `max_downsample`), or None: `attnpack.apply` leaves such layers alone."""
        return None

    def before_projection(
        self,
        attn: torch.nn.Module,
        site,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        """Before projection, on a layer the method acts on: the hidden states (and text) the call should
        run on, e.g. fewer tokens (token merging) or extra rows (repositioned references), and what
        `after_output` needs to undo that (kept on `call.prepared`), or None to leave everything as it is."""
        return hidden_states, encoder_hidden_states, None

    def after_output(self, prepared: Any, output: Any) -> Any:
        """The module's output in its original shape, from the output of the prepared call."""
        return output

    def processor_for(self, module: torch.nn.Module, site) -> Any:
        """What `attnpack.apply` installs on one attention module: the method itself, or a per-layer
        processor for methods with weights of their own per layer."""
        return self

    def install(self, processors: dict[torch.nn.Module, Any], denoisers: dict[str, torch.nn.Module]) -> Any:
        """Model-level changes `attnpack.apply` makes beside the processors (loading weights, adjusting a
        rotary embedding). `processors` maps each target module to what will be installed on it,
        `denoisers` the pipeline's denoisers by attribute. Returns a callable that undoes them, or None."""
        return None

    def attend_context(self, call: AttnCall, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Attention of the call's queries to one extra context (Wan I2V's image tokens): dense by default."""
        return model_dense_attention(call, call.query, key, value, scale=call.scale)

    def preview_pattern(self, grid: tuple[int, ...]) -> BlockSparsePattern | None:
        """The pattern the method would use at a latent token grid ((h, w) or (f, h, w)), for pictures; None
        where it has none there."""
        return None

    def config(self) -> dict[str, Any]:
        """The method's settings, for metadata and reports: {"method": name, **fields}."""
        return {"method": self.name, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    def __repr__(self) -> str:
        settings = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return f"{type(self).__name__}({settings})"


def dense(call: AttnCall) -> torch.Tensor:
    return model_dense_attention(
        call, call.query, call.key, call.value, attn_mask=call.attn_mask, scale=call.scale
    )


def attention_backend_of(call: AttnCall):
    """The diffusers attention backend the call's dense attention should run on, or None for attnpack's own
    dense kernel: the one `set_attention_backend` gave the module's processor, else diffusers' active one
    (`attention_backend(...)` blocks, DIFFUSERS_ATTN_BACKEND) when that is not plain SDPA."""
    backend = getattr(processor_of(call.module), "_attention_backend", None)
    if backend is not None:
        return backend
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend
    return None if active == AttentionBackendName.NATIVE else active


def model_dense_attention(call: AttnCall, query, key, value, *, attn_mask=None, scale=None) -> torch.Tensor:
    """Dense attention of (B, S, H, D) tensors, on the backend the user chose for the model
    (`attention_backend_of`), so that flash / sage / flex reach the parts of a method that are plain
    attention; attnpack's dense kernel where none was chosen."""
    backend = attention_backend_of(call)
    if backend is None:
        return dense_attention(query, key, value, attn_mask=attn_mask, scale=scale)
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    return dispatch_attention_fn(query, key, value, attn_mask=attn_mask, scale=scale, backend=backend)


def run_sparse(call: AttnCall, spec: SparseAttention, extra: tuple | None = None) -> torch.Tensor:
    """Run a `SparseAttention` on one GPU: the block-sparse kernel, or dense attention without a pattern.
    `extra` are keys and values that follow the call's own (`extra_keys`)."""
    if spec.pattern is None:
        return dense(call)
    key, value = call.key, call.value
    if extra is not None:
        key, value = torch.cat([key, extra[0]], dim=1), torch.cat([value, extra[1]], dim=1)
    return block_sparse_attention(
        call.query, key, value, spec.pattern, scale=spec.scale, key_padding=spec.key_padding
    )


def dense_attention_of(call: AttnCall) -> SparseAttention:
    """Dense attention as a `SparseAttention` (on one GPU `run_sparse` runs the call's own mask)."""
    padding = key_padding(call)
    return SparseAttention(None, call.scale, None if padding is False else padding)


def key_padding(call: AttnCall) -> torch.Tensor | bool | None:
    """The call's mask as a (B, Sk) key-padding mask: None without a mask, False when it is something else."""
    mask = call.attn_mask
    if mask is None:
        return None
    batch, key_len = call.key.shape[0], call.key.shape[1]
    if mask.dtype == torch.bool and mask.ndim == 4 and mask.shape[1] == 1 and mask.shape[2] == 1:
        return mask[:, 0, 0, :].expand(batch, key_len)
    return False


# Validation helpers: a bad value raises ValueError naming the parameter, the value and what is accepted.


def check_choice(owner: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        accepted = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{owner}: {name}={value!r} is not accepted; choose one of {accepted}")


def check_number(
    owner: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    integer: bool = False,
) -> None:
    kind = "an integer" if integer else "a number"
    valid_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    valid = valid_type and not isinstance(value, bool) and math.isfinite(value)
    if valid and low is not None:
        valid = value >= low if low_inclusive else value > low
    if valid and high is not None:
        valid = value <= high if high_inclusive else value < high
    if not valid:
        left = "(-inf" if low is None else ("[" if low_inclusive else "(") + f"{low:g}"
        right = "inf)" if high is None else f"{high:g}" + ("]" if high_inclusive else ")")
        raise ValueError(f"{owner}: {name}={value!r} is out of range; expected {kind} in {left}, {right}")
