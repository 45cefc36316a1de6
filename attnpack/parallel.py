"""Context parallelism: attnpack's methods under diffusers' own engine (Ulysses, ring, and the two together).

`transformer.enable_parallelism(config=ContextParallelConfig(...))` splits a denoiser's sequence over the
ranks with diffusers' hooks (the model's `_cp_plan`) and hands every processor the config. diffusers'
processors then attend through its templated context-parallel attention, which all-to-alls the heads
(Ulysses) or passes key chunks around the ring and merges them by their LSE (ring), calling a backend's
forward / backward op on what each rank holds. attnpack's processors take the same road with their own op:

- Ulysses: after the all-to-all a rank holds every token for a group of heads, in the order the ranks held
  them (FLUX: [text_0, image_0, text_1, image_1]). The op puts them in the family's order and runs the
  method's `attend` exactly as on one GPU, on those heads; backward recomputes it under autograd.
- Ring (alone or with Ulysses): a rank keeps its query shard and sees one key chunk at a time. The op runs
  the method's pattern restricted to (shard x chunk) (`attnpack.patterns.shards.restrict`) and returns the
  LSE that diffusers merges with; backward is the block-sparse backward of each chunk. Only attention that
  is one masked softmax can be merged so: methods describe it with `sparse_attention`. Blends of several
  attentions (agent attention, FreeNoise windows, FreeLong bands) ask for Ulysses.

Patterns are built once from the global layout (the context hooks see the inputs before diffusers splits
them) and restricted per rank. What is not supported raises, naming the method, the family and the config.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .families.base import AttnCall, ParallelLayout
from .kernels import block_sparse_attention, block_sparse_attention_backward, dense_attention
from .layout import TokenLayout
from .patterns.block_sparse import BlockSparsePattern
from .patterns.shards import allows_own_token, restrict
from .patterns.tiling import inverse_order

if TYPE_CHECKING:
    from .methods.base import AttentionMethod, SparseAttention

MODES = ("ulysses", "ring")
TESTED_DIFFUSERS = "0.42.1"  # the diffusers release whose templated context-parallel attention the tests ran


@functools.cache
def templated_attention():
    """diffusers' templated context-parallel attention, the private function its own backends call with a
    forward / backward op; found by feature, so that a diffusers without it fails here, clearly."""
    import inspect

    try:
        from diffusers.models.attention_dispatch import _templated_context_parallel_attention as function
    except ImportError:
        function = None
    names = set(inspect.signature(function).parameters) if function is not None else set()
    if not {"forward_op", "backward_op", "_parallel_config"} <= names:
        import diffusers

        raise RuntimeError(
            f"attnpack under context parallelism needs diffusers' templated context-parallel attention "
            f"(diffusers.models.attention_dispatch._templated_context_parallel_attention with forward_op / "
            f"backward_op), which diffusers {diffusers.__version__} does not have; attnpack was tested with "
            f"diffusers {TESTED_DIFFUSERS}"
        )
    return function


@dataclass(frozen=True)
class Mesh:
    """Where this rank sits: `ring` x `ulysses` ranks, the sequence split into ring * ulysses shards in
    diffusers' order (shard = ring_rank * ulysses + ulysses_rank)."""

    ring: int
    ulysses: int
    ring_rank: int
    ulysses_rank: int

    @property
    def shards(self) -> int:
        return self.ring * self.ulysses

    @property
    def own_shard(self) -> int:
        return self.ring_rank * self.ulysses + self.ulysses_rank

    @property
    def mode(self) -> str:
        return "ring" if self.ring > 1 else "ulysses"

    def chunk(self, step: int = 0) -> tuple[int, ...]:
        """The shards a rank holds after the Ulysses all-to-all, for the ring chunk `step` places on."""
        ring_rank = (self.ring_rank + step) % self.ring
        return tuple(ring_rank * self.ulysses + u for u in range(self.ulysses))

    def heads(self, num_heads: int) -> int:
        """The first of this rank's heads once the all-to-all has split them."""
        return self.ulysses_rank * (num_heads // self.ulysses) if self.ulysses > 1 else 0


def context_parallel_config(model: Any, processor: Any = None):
    """The diffusers `ParallelConfig` a denoiser (or, failing that, a processor) runs under, or None."""
    config = getattr(model, "_parallel_config", None) if model is not None else None
    if config is None and processor is not None:
        config = processor.__dict__.get("_parallel_config")  # what enable_parallelism set on it
    return config


def describe(config) -> str:
    """The parallel config as a person would write it."""
    cp = getattr(config, "context_parallel_config", None)
    if cp is None:
        tp = getattr(config, "tensor_parallel_config", None)
        return f"TensorParallelConfig(tp_degree={getattr(tp, 'tp_degree', '?')})"
    extras = "".join(
        f", {name}=True" for name in ("ulysses_anything", "ring_anything") if getattr(cp, name, False)
    )
    return f"ContextParallelConfig(ulysses_degree={cp.ulysses_degree}, ring_degree={cp.ring_degree}{extras})"


def mesh_of(config) -> Mesh:
    cp = config.context_parallel_config
    return Mesh(cp.ring_degree, cp.ulysses_degree, cp._ring_local_rank or 0, cp._ulysses_local_rank or 0)


def check_supported(method: AttentionMethod, family, role, config) -> None:
    """Raise ValueError unless `method` runs exactly on this family's layers under `config`."""
    owner = f"{type(method).__name__} ({method.name!r})"
    where = f"on {family.title}"
    cp = getattr(config, "context_parallel_config", None)
    if cp is None:
        raise ValueError(
            f"{owner} {where}: attnpack does not run under {describe(config)}; tensor parallelism shards the "
            "projections per rank, which attnpack's family adapters do not read. Use context parallelism "
            "(ContextParallelConfig) instead"
        )
    if cp.ulysses_anything or cp.ring_anything:
        raise ValueError(
            f"{owner} {where}: {describe(config)} splits the sequence unevenly, which attnpack does not "
            "support; use the plain ContextParallelConfig(ulysses_degree=..., ring_degree=...)"
        )
    if not family.context_parallel:
        raise ValueError(
            f"{owner} {where}: attnpack does not run under {describe(config)} on this family: "
            f"{family.context_parallel_note}"
        )
    mode = "ring" if cp.ring_degree > 1 else "ulysses"
    if method.acts_on(family.name, role) and mode not in method.context_parallel:
        supported = " and ".join(method.context_parallel) or "no context parallelism"
        raise ValueError(
            f"{owner} {where}: does not run under {describe(config)}; it supports {supported}. "
            f"{method.context_parallel_note}"
        )


@functools.lru_cache(maxsize=256)
def shard_tokens(streams: tuple[int, ...], num_shards: int, shards: tuple[int, ...]) -> torch.Tensor:
    """Global token ids of the rows a rank holds for `shards`: each shard holds its 1 / num_shards of every
    stream (a contiguous slice), streams one after another, shards one after another."""
    offsets = [0, *itertools.accumulate(streams)][:-1]
    parts = []
    for shard in shards:
        for offset, length in zip(offsets, streams, strict=True):
            size = length // num_shards
            parts.append(torch.arange(offset + shard * size, offset + (shard + 1) * size))
    return torch.cat(parts)


@functools.lru_cache(maxsize=64)
def _inverse(streams: tuple[int, ...], num_shards: int) -> torch.Tensor | None:
    """Gathered position of each token when every shard is held in order; None when that is the identity."""
    order = shard_tokens(streams, num_shards, tuple(range(num_shards)))
    if len(streams) == 1:
        return None
    return inverse_order(order)


def context_parallel_plan(model: torch.nn.Module) -> dict:
    """The `cp_plan` to give `model.enable_parallelism(config=..., cp_plan=...)` for attnpack: diffusers'
    own where the model has one (Wan, FLUX), attnpack's where it has none (HunyuanVideo)."""
    from .families import family_of

    family = family_of(getattr(model, "_orig_mod", model))
    if family is None:
        raise ValueError(f"context_parallel_plan: {type(model).__name__} is not a denoiser attnpack supports")
    plan = family.context_parallel_plan(model) if family.context_parallel else None
    if plan is None:
        raise ValueError(
            f"context_parallel_plan: no context-parallel plan for {type(model).__name__} ({family.title}): "
            f"{family.context_parallel_note}"
        )
    return plan


def local_shard(tensor: torch.Tensor, dim: int, config) -> torch.Tensor:
    """This rank's part of a tensor along `dim`, the way diffusers' equipartition sharder cuts it."""
    mesh = mesh_of(config)
    return tensor.chunk(mesh.shards, dim=dim)[mesh.own_shard]


def attend(method: AttentionMethod, call: AttnCall, config) -> torch.Tensor:
    """The attention of one call whose inputs diffusers split over the ranks: (B, S_local, H, D)."""
    from .methods.dense import DenseAttention

    site = call.site
    acting = method if method.acts_on(site.family.name, call.layout.role) else DenseAttention()
    mesh = mesh_of(config)
    parallel = site.family.parallel_layout(call)
    if parallel is None:  # this layer runs before diffusers splits (HunyuanVideo's token refiner)
        return acting.attend(call) if acting is method else _dense(call)
    _check_lengths(acting, call, parallel, mesh)
    if parallel.kv_streams is None:  # keys on every rank: Wan's cross-attention
        return _local(acting, call, parallel, mesh)
    query, key, value = call.query, call.key, call.value
    kv_streams = parallel.kv_streams
    extra = acting.extra_keys(_shard_call(call, parallel, mesh)) if mesh.ring > 1 else None
    if extra is not None:  # keys of the method's own (CLEAR's pooled tokens), made from what the rank holds
        key, value = torch.cat([key, extra[0]], dim=1), torch.cat([value, extra[1]], dim=1)
        kv_streams = (*kv_streams, extra[0].shape[1] * mesh.shards)
    op = ContextParallelOp(acting, call, parallel, kv_streams, mesh)
    return templated_attention()(
        query, key, value, forward_op=op.forward, backward_op=op.backward, _parallel_config=config
    )


def _dense(call: AttnCall) -> torch.Tensor:
    return dense_attention(call.query, call.key, call.value, attn_mask=call.attn_mask, scale=call.scale)


def _check_lengths(method, call: AttnCall, parallel: ParallelLayout, mesh: Mesh) -> None:
    heads = call.query.shape[2]
    if heads % mesh.ulysses:
        raise ValueError(
            f"{type(method).__name__} on {call.site.name}: {heads} heads do not split over ulysses_degree="
            f"{mesh.ulysses}; choose a degree that divides the number of heads"
        )
    for name, streams, tensor in (
        ("queries", parallel.q_streams, call.query),
        ("keys", parallel.kv_streams, call.key),
    ):
        if streams is None:
            continue
        if any(length % mesh.shards for length in streams) or sum(streams) != tensor.shape[1] * mesh.shards:
            raise ValueError(
                f"{type(method).__name__} on {call.site.name}: the {name} hold {tensor.shape[1]} tokens on "
                f"this rank, which is not 1/{mesh.shards} of the parts {list(streams)} the model's "
                "context-parallel plan splits; attnpack reads the sequence as diffusers' plan for the model "
                "splits it (each part evenly)"
            )


def _canonical_mask(parallel: ParallelLayout) -> torch.Tensor | None:
    padding = parallel.key_padding
    return None if padding is None else padding[:, None, None, :]


def _shard_call(call: AttnCall, parallel: ParallelLayout, mesh: Mesh) -> AttnCall:
    """The call as this rank holds it, with the layout of its shard (e.g. FLUX: H / N image rows)."""
    layout = parallel.layout
    grid = layout.grid
    shard_grid = (
        (grid[0] // mesh.shards, *grid[1:]) if grid is not None and grid[0] % mesh.shards == 0 else None
    )
    shard = TokenLayout(
        layout.role,
        call.query.shape[1],
        call.key.shape[1],
        grid=shard_grid,
        text_len=layout.text_len // mesh.shards,
        text_first=layout.text_first,
    )
    return AttnCall(
        call.query, call.key, call.value, layout=shard, module=call.module, site=call.site,
        context=call.context, scale=call.scale,
    )  # fmt: skip


def _skeleton(call: AttnCall, parallel: ParallelLayout, heads: int, kv_len: int) -> AttnCall:
    """A call with the global shapes and no data: what `sparse_attention` reads (shapes, device, dtype)."""
    layout = parallel.layout
    batch, _, _, dim = call.query.shape
    empty = call.query.new_zeros(())
    return AttnCall(
        empty.expand(batch, layout.query_len, heads, dim),
        empty.expand(batch, kv_len, heads, dim),
        empty.expand(batch, kv_len, heads, dim),
        layout=layout,
        module=call.module,
        site=call.site,
        context=call.context,
        attn_mask=_canonical_mask(parallel),
        scale=call.scale,
    )


@functools.lru_cache(maxsize=32)
def _dense_pattern(q_len: int, kv_len: int, device: str) -> BlockSparsePattern:
    return BlockSparsePattern.dense(q_len, kv_len).to(device)


def _pattern_of(spec: SparseAttention, q_len: int, kv_len: int, device) -> BlockSparsePattern:
    return spec.pattern if spec.pattern is not None else _dense_pattern(q_len, kv_len, str(device))


def _groups(pattern: BlockSparsePattern, first_head: int, heads: int, total_heads: int) -> slice:
    """The pattern's head groups that serve heads [first_head, first_head + heads)."""
    groups = pattern.num_groups
    if groups == 1:
        return slice(0, 1)
    per_group = total_heads // groups
    if first_head % per_group == 0 and heads % per_group == 0:
        return slice(first_head // per_group, (first_head + heads) // per_group)
    if per_group % heads == 0:
        return slice(first_head // per_group, first_head // per_group + 1)
    raise ValueError(
        f"context parallelism: a pattern with {groups} head groups over {total_heads} heads cannot serve "
        f"heads {first_head}..{first_head + heads - 1} of one rank; choose a ulysses_degree that keeps "
        "head groups whole"
    )


def _sparse(method: AttentionMethod, skeleton: AttnCall) -> SparseAttention:
    spec = method.sparse_attention(skeleton)
    if spec is None:
        raise ValueError(
            f"{type(method).__name__} on {skeleton.site.name}: its attention is not one masked softmax, so "
            "it cannot run on sequence shards; use ContextParallelConfig(ulysses_degree=...)"
        )
    return spec


def _chunk_padding(spec: SparseAttention, shard, kv_tokens: torch.Tensor, batch: int) -> torch.Tensor | None:
    """Key padding of a shard pattern's keys: the spec's, and False where the key belongs to another rank."""
    real = shard.kv_index >= 0
    if spec.key_padding is None:
        return None if bool(real.all()) else real[None].expand(batch, -1)
    padding = spec.key_padding[:, kv_tokens.to(spec.key_padding.device)]
    padding = torch.cat([padding, padding.new_zeros(batch, 1)], dim=1)
    return padding[:, shard.kv_index]


def _local(method, call: AttnCall, parallel: ParallelLayout, mesh: Mesh) -> torch.Tensor:
    """Split queries, whole keys (no communication): the pattern restricted to this rank's query rows."""
    skeleton = _skeleton(call, parallel, call.query.shape[2], call.key.shape[1])
    spec = _sparse(method, skeleton)
    if spec.pattern is None:
        return dense_attention(call.query, call.key, call.value, attn_mask=call.attn_mask, scale=spec.scale)
    q_tokens = shard_tokens(parallel.q_streams, mesh.shards, (mesh.own_shard,))
    kv_tokens = torch.arange(call.key.shape[1])
    shard = restrict(spec.pattern, q_tokens, kv_tokens)
    if shard.pattern is None:
        return torch.zeros_like(call.query)
    out = block_sparse_attention(
        shard.gather(call.query, shard.q_index),
        shard.gather(call.key, shard.kv_index),
        shard.gather(call.value, shard.kv_index),
        shard.pattern,
        scale=spec.scale,
        key_padding=_chunk_padding(spec, shard, kv_tokens, call.query.shape[0]),
    )
    return shard.scatter(out, call.query.shape[1], shard.q_positions, shard.q_rows)


class ContextParallelOp:
    """attnpack's forward / backward op for diffusers' templated context-parallel attention, for one call.

    diffusers calls `forward` once per ring step (once in all for Ulysses), the first with `_save_ctx`, and
    `backward` in the same order; the op counts the steps to know which key chunk it holds.
    """

    def __init__(self, method, call: AttnCall, parallel: ParallelLayout, kv_streams, mesh: Mesh):
        self.method, self.call, self.parallel, self.mesh = method, call, parallel, mesh
        self.kv_streams = tuple(kv_streams)
        self.total_heads = call.query.shape[2]
        self.first_head = mesh.heads(self.total_heads)
        self.step = self.backward_step = 0
        self.spec = None

    # ---- Ulysses: every token, some heads

    def ulysses(self, query, key, value) -> torch.Tensor:
        parallel = self.parallel
        q_inverse = _inverse(parallel.q_streams, self.mesh.shards)
        kv_inverse = _inverse(self.kv_streams, self.mesh.shards)
        if q_inverse is not None:
            query = query[:, q_inverse.to(query.device)]
        if kv_inverse is not None:
            key, value = key[:, kv_inverse.to(key.device)], value[:, kv_inverse.to(key.device)]
        canonical = AttnCall(
            query, key, value, layout=parallel.layout, module=self.call.module, site=self.call.site,
            context=self.call.context, attn_mask=_canonical_mask(parallel), scale=self.call.scale,
            head_start=self.first_head,
        )  # fmt: skip
        out = self.method.attend(canonical)
        if q_inverse is not None:
            order = shard_tokens(parallel.q_streams, self.mesh.shards, tuple(range(self.mesh.shards)))
            out = out[:, order.to(out.device)]
        return out

    # ---- ring: this rank's query rows, one key chunk at a time

    def shard(self, step: int, query: torch.Tensor, key: torch.Tensor):
        if self.spec is None:
            skeleton = _skeleton(self.call, self.parallel, query.shape[2], sum(self.kv_streams))
            self.spec = _sparse(self.method, skeleton)
        spec, mesh = self.spec, self.mesh
        pattern = _pattern_of(spec, self.parallel.layout.query_len, sum(self.kv_streams), query.device)
        if pattern.kv_len != sum(self.kv_streams):
            raise ValueError(
                f"{type(self.method).__name__} on {self.call.site.name}: its pattern has {pattern.kv_len} keys, "
                f"the ranks hold {sum(self.kv_streams)}: keys the method adds (CLEAR's pooled tokens) are made "
                "from each rank's share of the image, which must be whole rows of it (rows divisible by "
                f"{mesh.shards} times the pooling factor)"
            )
        q_tokens = shard_tokens(self.parallel.q_streams, mesh.shards, mesh.chunk(0))
        kv_tokens = shard_tokens(self.kv_streams, mesh.shards, mesh.chunk(step))
        groups = _groups(pattern, self.first_head, query.shape[2], self.total_heads)
        shard = restrict(pattern, q_tokens, kv_tokens, groups)
        if step == 0:
            self._check_own_chunk(pattern, q_tokens)
        return spec, shard, _chunk_padding(spec, shard, kv_tokens, query.shape[0])

    def _check_own_chunk(self, pattern: BlockSparsePattern, q_tokens: torch.Tensor) -> None:
        key = ("own", *q_tokens[[0, -1]].tolist(), len(q_tokens))
        checked = pattern.__dict__.setdefault("_shards", {})
        if key not in checked:
            checked[key] = bool(allows_own_token(pattern, q_tokens).all())
        if not checked[key]:
            raise ValueError(
                f"{type(self.method).__name__} on {self.call.site.name}: its pattern keeps some queries from "
                "their own token, which ring attention cannot merge exactly (a query with no key in its own "
                "shard); use ContextParallelConfig(ulysses_degree=...)"
            )

    def ring_chunk(self, query, key, value, step: int):
        spec, shard, padding = self.shard(step, query, key)
        rows = query.shape[1]
        if shard.pattern is None:
            lse = query.new_full((query.shape[0], rows, query.shape[2]), float("-inf"), dtype=torch.float32)
            return torch.zeros_like(query), lse
        out, lse = block_sparse_attention(
            shard.gather(query, shard.q_index),
            shard.gather(key, shard.kv_index),
            shard.gather(value, shard.kv_index),
            shard.pattern,
            scale=spec.scale,
            key_padding=padding,
            return_lse=True,
        )
        out = shard.scatter(out, rows, shard.q_positions, shard.q_rows)
        return out, shard.scatter(lse, rows, shard.q_positions, shard.q_rows, float("-inf"))

    def ring_chunk_backward(self, grad_out, query, key, value, out, lse, step: int):
        spec, shard, padding = self.shard(step, query, key)
        grads = [torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)]
        if shard.pattern is None:
            return tuple(grads)
        rows = lambda x: shard.gather(x, shard.q_index)  # noqa: E731
        lse = torch.cat([lse, lse.new_zeros(lse.shape[0], 1, lse.shape[2])], dim=1)[:, shard.q_index]
        dq, dk, dv = block_sparse_attention_backward(
            rows(grad_out), rows(query), shard.gather(key, shard.kv_index), shard.gather(value, shard.kv_index),
            rows(out), lse, shard.pattern, scale=spec.scale, key_padding=padding,
        )  # fmt: skip
        grads[0][:, shard.q_rows] = dq[:, shard.q_positions]
        grads[1][:, shard.kv_rows] = dk[:, shard.kv_positions]
        grads[2][:, shard.kv_rows] = dv[:, shard.kv_positions]
        return tuple(grads)

    # ---- what diffusers calls

    def forward(self, ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):  # fmt: skip
        if _save_ctx:
            ctx.save_for_backward(query, key, value)
            self.step = 0
        if self.mesh.ring == 1:
            out = self.ulysses(query, key, value)
            return (out, None) if return_lse else out
        out, lse = self.ring_chunk(query, key, value, self.step)
        self.step += 1
        return (out, lse) if return_lse else out

    def backward(self, ctx, grad_out, *args, query=None, key=None, value=None, out=None, lse=None, **kwargs):
        if self.mesh.ring == 1:
            saved = [x.detach().requires_grad_() for x in ctx.saved_tensors[:3]]
            with torch.enable_grad():
                recomputed = self.ulysses(*saved)
            return torch.autograd.grad(recomputed, saved, grad_out, allow_unused=True)
        step, self.backward_step = self.backward_step, self.backward_step + 1
        return self.ring_chunk_backward(grad_out, query, key, value, out, lse, step)


__all__ = [
    "MODES",
    "ContextParallelOp",
    "Mesh",
    "attend",
    "check_supported",
    "context_parallel_config",
    "context_parallel_plan",
    "describe",
    "local_shard",
    "mesh_of",
    "shard_tokens",
]
