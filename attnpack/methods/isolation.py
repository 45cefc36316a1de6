"""IsolationAttention: IR-Diffusion's isolation + reposition attention (several consistent subjects in one
image), training-free, for SDXL-architecture UNets (SDXL, Playground v2.5) and FLUX.

The batch holds, per guidance half, [reference 1 .. reference n, target]: each reference shows one subject
(from its own prompt, or a given image noised to the step), the target is the scene. References run plain
attention. The target's self-attention, from `start_layer` and `start_step` on, also reads each reference:

- keys = [reference 1 .. reference n (repositioned), target]; a target query inside subject i's mask sees
  reference i inside its (moved) mask, never reference j; per denoising step a Bernoulli draw
  (`dropout`, per query token) takes some of subject i's queries off reference i;
- isolation (every self-attention layer): a query in subject i's mask never sees target keys in subject
  j's mask; background queries see target keys only;
- reposition: reference hidden states x its mask, cropped to the mask's box, resized (nearest) to the target
  subject's box and pasted on a zero canvas before `to_k` / `to_v` (extra batch rows, projected with the
  target's positions), the mask moved the same way.

Cross-attention (UNets), every layer and step: inside subject i's mask the target's output is blended,
(1 - λ) vanilla + λ mutual, mutual being the target queries' attention to reference i's prompt, λ =
`cross_attention_blend`. FLUX has no separate cross-attention: there subject i's queries also see reference
i's text tokens in the joint attention.

All masks run in the block-sparse kernel as token segment ids (`attnpack.patterns.subjects`), never as
S x S tensors. Masks come from each subject's `box` / `mask` (target) and `reference_box` /
`reference_mask`, or, where missing, from attention maps: the mean of SA^k · CA (k = 1..4) on the
subject's token indices, gathered during a step and thresholded (Otsu) for the next one.
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..families.base import AttnCall
from ..kernels import block_sparse_attention, dense_attention
from ..layout import Role, downsampled_grid
from ..patterns.subjects import (
    Segments,
    box_mask,
    check_box,
    otsu_threshold,
    reposition,
    resize_mask,
    segment_pattern,
)
from .base import AttentionMethod, check_choice, check_number, dense, model_dense_attention
from .needs import Input, Needs

logger = logging.getLogger("attnpack")

MAP_TOKENS = 4096  # attention maps are gathered on layers with at most this many image tokens


@dataclass
class Subject:
    """One subject: `name` (its word in the prompts), `prompt` (its reference image's prompt), where it
    stands in the target (`box` (x0, y0, x1, y1) in [0, 1] or a `mask`), and where in its reference
    (`reference_box` / `reference_mask`). Token indices of the name in the scene / reference prompt feed
    the attention-map masks; `attnpack.pipelines.multi_subject` fills them in."""

    name: str
    prompt: str
    box: tuple[float, float, float, float] | None = None
    mask: torch.Tensor | None = None
    reference_box: tuple[float, float, float, float] | None = None
    reference_mask: torch.Tensor | None = None
    token_indices: tuple[int, ...] = ()
    reference_token_indices: tuple[int, ...] = ()

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"Subject: name={self.name!r} must be a non-empty string")
        if not isinstance(self.prompt, str):
            raise ValueError(f"Subject {self.name!r}: prompt={self.prompt!r} must be a string")
        if self.box is not None:
            self.box = check_box(self.box, f"Subject {self.name!r}: box")
        if self.reference_box is not None:
            self.reference_box = check_box(self.reference_box, f"Subject {self.name!r}: reference_box")
        for label in ("mask", "reference_mask"):
            mask = getattr(self, label)
            if mask is not None:
                mask = torch.as_tensor(mask)
                if mask.ndim != 2 or not bool((mask > 0).any()):
                    raise ValueError(f"Subject {self.name!r}: {label} must be a non-empty (H, W) mask")
                setattr(self, label, mask > 0.5 if mask.is_floating_point() else mask.bool())
        self.token_indices = tuple(int(i) for i in self.token_indices)
        self.reference_token_indices = tuple(int(i) for i in self.reference_token_indices)

    @classmethod
    def of(cls, value: Subject | dict) -> Subject:
        if isinstance(value, Subject):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"subjects: {value!r} must be a Subject or a dict with name, prompt and box")
        unknown = set(value) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(
                f"subjects: unknown keys {sorted(unknown)}; accepted: {list(cls.__dataclass_fields__)}"
            )
        return cls(**value)

    def target_mask(self, grid: tuple[int, int]) -> torch.Tensor | None:
        if self.mask is not None:
            return resize_mask(self.mask, grid)
        return None if self.box is None else box_mask(self.box, grid)

    def source_mask(self, grid: tuple[int, int]) -> torch.Tensor | None:
        if self.reference_mask is not None:
            return resize_mask(self.reference_mask, grid)
        return None if self.reference_box is None else box_mask(self.reference_box, grid)


@dataclass
class _Step:
    """What one denoising step shares across layers: the dropout draws and the attention maps gathered."""

    index: int | None = None
    keep: dict[tuple[int, int, int], torch.Tensor] = field(default_factory=dict)  # (subject, h, w) -> (h, w)
    maps: dict[str, torch.Tensor] = field(default_factory=dict)  # "target i" / "reference i" -> (h, w) sum
    counts: dict[str, int] = field(default_factory=dict)
    self_attention: dict[str, torch.Tensor] = field(default_factory=dict)  # block -> (rows, N, N) for the CA
    patterns: dict[tuple, object] = field(default_factory=dict)  # (grid, text, mutual, device) -> pattern


@dataclass(eq=False)
class IsolationRun:
    """What one IsolationAttention finds on one attached pipeline (kept in its AttnContext): the current
    step's shared state and the masks found from attention maps, at the map grid."""

    step: _Step = field(default_factory=_Step)
    found: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(eq=False)
class IsolationPrepared:
    """What `before_projection` made of one self-attention call, for `attend` and `after_output`."""

    grid: tuple[int, int] | None  # the call's image grid
    masks: tuple[list, list] | None  # (target masks, source masks) at `grid`, None while unknown
    state: _Step  # this step's shared state
    rows: int  # the module's own batch rows; repositioned reference rows follow them
    extra: int = 0  # repositioned reference rows added
    moved: list = field(default_factory=list)  # per added row: where the reference landed (h, w) bool


@dataclass(eq=False, repr=False)
class IsolationAttention(AttentionMethod):
    """IR-Diffusion. `subjects`: Subject objects or dicts (name, prompt, box, ...); `start_layer`: the first
    self-attention layer (forward order) with mutual attention (None: 36 of SDXL's 70, 19 of FLUX's 57);
    `start_step`; `dropout`: probability that a subject query skips its reference in a step;
    `cross_attention_blend`: λ; `reposition`, `isolate`: the two mechanisms; `seed`: the dropout draws."""

    subjects: list = field(default_factory=list)
    start_layer: int | None = None
    start_step: int = 0
    dropout: float = 0.5
    cross_attention_blend: float = 0.9
    reposition: bool = True
    isolate: bool = True
    seed: int = 0

    name: ClassVar[str] = "isolation"
    needs: ClassVar[Needs] = Needs(
        runner="multi_subject", tab="Several subjects",
        inputs=(Input("subjects", "subjects", "Subjects (boxes in [0, 1])", required=True),),
    )  # fmt: skip
    families: ClassVar[tuple[str, ...]] = ("unet", "flux")
    roles: ClassVar[frozenset[Role]] = frozenset({Role.SELF, Role.CROSS, Role.JOINT})
    family_roles: ClassVar[dict[str, frozenset[Role]]] = {
        "unet": frozenset({Role.SELF, Role.CROSS}),
        "flux": frozenset({Role.JOINT}),
    }
    needs_context: ClassVar[bool] = True

    context_parallel_note: ClassVar[str] = (
        "It repositions reference features across the whole image before the projections, and diffusers' "
        "context parallelism has split the image by then"
    )

    def __post_init__(self):
        owner = "IsolationAttention"
        if not isinstance(self.subjects, list | tuple) or not self.subjects:
            raise ValueError(f"{owner}: subjects={self.subjects!r} must be a non-empty list of subjects")
        self.subjects = [Subject.of(s) for s in self.subjects]
        names = [s.name for s in self.subjects]
        if len(set(names)) != len(names):
            raise ValueError(f"{owner}: subject names must differ; got {names}")
        self.segments = Segments(len(self.subjects))
        if self.start_layer is not None:
            check_number(owner, "start_layer", self.start_layer, low=0, integer=True)
        check_number(owner, "start_step", self.start_step, low=0, integer=True)
        check_number(owner, "dropout", self.dropout, low=0, high=1)
        check_number(owner, "cross_attention_blend", self.cross_attention_blend, low=0, high=1)
        check_choice(owner, "reposition", self.reposition, (True, False))
        check_choice(owner, "isolate", self.isolate, (True, False))
        check_number(owner, "seed", self.seed, low=0, integer=True)
        # The run state lives in each pipeline's AttnContext (`run`); this is only the latest one, for the
        # deprecated `_step` / `_found`. Nothing reads it during a run.
        self._latest_run: IsolationRun | None = None

    def config(self) -> dict[str, Any]:
        out = super().config()
        out["subjects"] = [
            {k: v for k, v in vars(s).items() if v is not None and k not in ("mask", "reference_mask")}
            for s in self.subjects
        ]
        return out

    # ---- batch, step, masks

    @property
    def group(self) -> int:
        return len(self.subjects) + 1

    def check_batch(self, batch: int, name: str) -> None:
        if batch % self.group:
            raise ValueError(
                f"IsolationAttention: {name} got a batch of {batch}; it expects [reference 1 .. reference "
                f"{len(self.subjects)}, target] per guidance half ({self.group} rows each). Generate with "
                "attnpack.pipelines.multi_subject, or lay out the batch that way"
            )

    def run(self, ctx) -> IsolationRun:
        """This method's run state on the context's pipeline."""
        run = ctx.state_for(self, IsolationRun)
        self._latest_run = run
        return run

    def step(self, ctx) -> _Step:
        """This step's shared state; a new step first turns the last step's attention maps into masks."""
        run = self.run(ctx)
        index = ctx.step_index
        if index != run.step.index:
            for key, total in run.step.maps.items():
                found = total / run.step.counts[key]
                found = (found - found.min()) / (found.max() - found.min()).clamp(min=1e-12)
                run.found[key] = found > otsu_threshold(found)
            if index is None or index == 0 or (run.step.index is not None and index < run.step.index):
                run.found = {}  # a new run
            run.step = _Step(index=index)
        return run.step

    @property
    def _step(self) -> _Step:
        warnings.warn(
            "IsolationAttention._step is deprecated: the run state lives in the pipeline's context, "
            "attnpack.attach(pipe).state_for(method, IsolationRun).step",
            DeprecationWarning,
            stacklevel=2,
        )
        return self._latest_run.step if self._latest_run is not None else _Step()

    @property
    def _found(self) -> dict[str, torch.Tensor]:
        warnings.warn(
            "IsolationAttention._found is deprecated: use MultiSubjectOutput.masks, or the run state in the "
            "pipeline's context, attnpack.attach(pipe).state_for(method, IsolationRun).found",
            DeprecationWarning,
            stacklevel=2,
        )
        return self._latest_run.found if self._latest_run is not None else {}

    def masks(
        self, grid: tuple[int, int], found: dict[str, torch.Tensor] | None = None
    ) -> tuple[list, list] | None:
        """(target masks, source masks) at `grid` from the subjects' boxes and masks, else from the masks
        `found` from attention maps; None while some are still unknown."""
        found = found or {}
        targets, sources = [], []
        for i, subject in enumerate(self.subjects):
            target = subject.target_mask(grid)
            if target is None and f"target {i}" in found:
                target = resize_mask(found[f"target {i}"], grid)
            source = subject.source_mask(grid)
            if source is None and f"reference {i}" in found:
                source = resize_mask(found[f"reference {i}"], grid)
            if target is None or source is None or not target.any() or not source.any():
                return None
            targets.append(target)
            sources.append(source)
        return _without_overlaps(targets), sources

    def keep(self, state: _Step, i: int, grid: tuple[int, int], device) -> torch.Tensor:
        """Subject i's queries that read their reference this step (the Bernoulli draw, per step)."""
        key = (i, *grid)
        if key not in state.keep:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + (state.index or 0) * 1_009 + i)
            state.keep[key] = (torch.rand(grid, generator=generator) >= self.dropout).to(device)
        return state.keep[key]

    def mutual_now(self, call_site, ctx) -> bool:
        start = self.start_layer if self.start_layer is not None else call_site.family.deep_layers_start
        if start is None:
            raise ValueError(
                f"IsolationAttention: start_layer=None takes the family's first deep layer, and "
                f"{call_site.family.title} names none; pass start_layer (an integer >= 0)"
            )
        return call_site.role_index >= start and (ctx.step_index or 0) >= self.start_step

    # ---- before projection: repositioned reference rows

    def before_projection(self, attn, site, hidden_states, encoder_hidden_states, attention_mask):
        if site.role is Role.CROSS:
            return hidden_states, encoder_hidden_states, None
        self.check_batch(hidden_states.shape[0], site.name)
        ctx = site.context
        state = self.step(ctx)
        text_len = site.adapter.leading_text_len(site, encoder_hidden_states)  # [text, image] in one sequence
        image_len = hidden_states.shape[1] - text_len
        grid = _image_grid(ctx, image_len)
        masks = self.masks(grid, self.run(ctx).found) if grid is not None else None
        prepared = IsolationPrepared(grid, masks, state, rows=hidden_states.shape[0])
        if masks is None or not self.mutual_now(site, ctx):
            return hidden_states, encoder_hidden_states, prepared
        targets, sources = masks
        n, halves = len(self.subjects), hidden_states.shape[0] // self.group
        rows, moved_masks = [], []
        for h in range(halves):
            for i in range(n):
                reference = hidden_states[h * self.group + i]
                image = reference[text_len:].reshape(*grid, -1)
                if self.reposition:
                    moved, moved_mask = reposition(image, sources[i], targets[i])
                else:
                    moved, moved_mask = image * sources[i].to(image)[..., None], sources[i]
                rows.append(torch.cat([reference[:text_len], moved.reshape(image_len, -1)]))
                moved_masks.append(moved_mask)
        prepared.extra, prepared.moved = len(rows), moved_masks
        hidden_states = torch.cat([hidden_states, torch.stack(rows)])
        if encoder_hidden_states is not None:
            refs = [encoder_hidden_states[h * self.group + i] for h in range(halves) for i in range(n)]
            encoder_hidden_states = torch.cat([encoder_hidden_states, torch.stack(refs)])
        return hidden_states, encoder_hidden_states, prepared

    def after_output(self, prepared: IsolationPrepared, output):
        rows = prepared.rows
        if isinstance(output, tuple):
            return tuple(x[:rows] for x in output)
        return output[:rows]

    # ---- attention

    def attend(self, call: AttnCall) -> torch.Tensor:
        if call.layout.role is Role.CROSS:
            return self.attend_cross(call)
        prepared: IsolationPrepared = call.prepared
        rows, grid, masks = prepared.rows, prepared.grid, prepared.masks
        out = torch.zeros_like(call.query)
        out[:rows] = model_dense_attention(
            call,
            call.query[:rows],
            call.key[:rows],
            call.value[:rows],
            attn_mask=_rows(call.attn_mask, rows),
            scale=call.scale,
        )
        if grid is not None and grid[0] * grid[1] <= MAP_TOKENS:
            self.gather_self_attention(call, prepared)
        if masks is None:
            return out  # masks not known yet (found from attention maps from the next step on)
        targets, _ = masks
        n, text = len(self.subjects), call.layout.text_len if call.layout.role is Role.JOINT else 0
        extra, device, state = prepared.extra, call.query.device, prepared.state
        key = (grid, text, extra > 0, str(device))
        if key not in state.patterns:  # the masks and this step's draws are the same for every layer and row
            moved = prepared.moved[:n] if extra else None
            query_segments, key_segments = self.row_segments(targets, moved, state, grid, text)
            state.patterns[key] = self.pattern(query_segments, torch.cat(key_segments), extra > 0, device)
        pattern = state.patterns[key]
        for h in range(rows // self.group):
            target_row = h * self.group + n
            parts = []  # (row, tokens) in the order of key_segments
            for i in range(n if extra else 0):
                parts.append((rows + h * n + i, slice(None)))
                if text:  # FLUX: reference i's text, for subject i's queries
                    parts.append((h * self.group + i, slice(None, text)))
            parts.append((target_row, slice(None)))
            out[target_row] = block_sparse_attention(
                call.query[target_row][None],
                torch.cat([call.key[row, tokens] for row, tokens in parts])[None],
                torch.cat([call.value[row, tokens] for row, tokens in parts])[None],
                pattern,
                scale=call.scale,
            )[0]
        return out

    def row_segments(self, targets, moved, state: _Step, grid, text: int) -> tuple[torch.Tensor, list]:
        """Segments of a target row's queries, and of its keys part by part in the order `attend` joins
        them: per subject the repositioned reference (its text, then its image; `moved`: where the reference
        landed) and for FLUX the reference's own text; then the target. `moved` None: no references."""
        seg = self.segments
        image = torch.full((grid[0] * grid[1],), seg.BACKGROUND, dtype=torch.int32)
        for i, target in enumerate(targets):
            image[target.flatten().cpu()] = seg.subject(i)
        target_segments = torch.cat([torch.full((text,), seg.TEXT, dtype=torch.int32), image])
        query_segments, key_segments = target_segments.clone(), []
        for i in range(len(targets) if moved is not None else 0):
            dropped = targets[i].flatten().cpu() & ~self.keep(state, i, grid, "cpu").flatten()
            query_segments[text:][dropped] = seg.dropped(i)
            reference = torch.full((text + moved[i].numel(),), seg.HIDDEN, dtype=torch.int32)
            reference[text:][moved[i].flatten().cpu()] = seg.reference(i)
            key_segments.append(reference)
            if text:
                key_segments.append(torch.full((text,), seg.reference_text(i), dtype=torch.int32))
        return query_segments, [*key_segments, target_segments]

    def pattern(self, query_segments: torch.Tensor, key_segments: torch.Tensor, mutual: bool, device):
        """The isolation pattern of a segment layout (CPU tensors), built once per layout and device: the
        layouts repeat over layers, steps and the rows of a batch, and change only with the masks."""
        return _segment_layout_pattern(
            query_segments.to(torch.int32).numpy().tobytes(),
            key_segments.to(torch.int32).numpy().tobytes(),
            len(self.subjects),
            self.isolate,
            mutual,
            str(device),
        )

    def attend_cross(self, call: AttnCall) -> torch.Tensor:
        rows = call.query.shape[0]
        self.check_batch(rows, call.site.name)
        out = dense(call)
        ctx = call.context
        grid = _image_grid(ctx, call.query.shape[1])
        if grid is None:
            return out
        if grid[0] * grid[1] <= MAP_TOKENS:
            self.gather_cross_attention(call, grid)
        masks = self.masks(grid, self.run(ctx).found)
        if masks is None or self.cross_attention_blend == 0:
            return out
        targets, _ = masks
        n, lam = len(self.subjects), self.cross_attention_blend
        weights = torch.stack([t.flatten() for t in targets]).to(out.device, torch.float32)  # (n, N)
        covered = weights.sum(0)
        inside = (covered > 0).float()[:, None, None]
        for h in range(rows // self.group):
            t = h * self.group + n
            mutual = torch.zeros_like(out[t], dtype=torch.float32)
            for i in range(n):
                r = h * self.group + i
                c_i = dense_attention(
                    call.query[t][None], call.key[r][None], call.value[r][None], scale=call.scale
                )[0]
                mutual += weights[i][:, None, None] * c_i.float()
            mutual = mutual / covered.clamp(min=1e-8)[:, None, None]
            vanilla = out[t].float()
            out[t] = (vanilla * (1 - inside) + inside * ((1 - lam) * vanilla + lam * mutual)).to(out.dtype)
        return out

    # ---- attention maps for masks

    def _conditional_rows(self, rows: int) -> range:
        """The rows of the last guidance half (the conditional one in diffusers' [negative, positive])."""
        return range(rows - self.group, rows)

    def gather_self_attention(self, call: AttnCall, prepared: IsolationPrepared) -> None:
        if not self._needs_maps():
            return
        rows, grid = prepared.rows, prepared.grid
        text = call.layout.text_len if call.layout.role is Role.JOINT else 0
        image = slice(text, text + grid[0] * grid[1])
        state = prepared.state
        probabilities = []
        for r in self._conditional_rows(rows):
            probs = _head_mean_probs(call.query[r, image], call.key[r], call.scale)  # (N, S)
            probabilities.append(probs)
        if call.layout.role is Role.JOINT:  # FLUX: one softmax holds both maps
            for k, probs in enumerate(probabilities):
                sa = probs[:, image]
                sa = sa / sa.sum(-1, keepdim=True).clamp(min=1e-12)
                self._add_maps(state, k, sa, probs[:, :text], grid)
        else:
            state.self_attention[_block_of(call.site.local_name)] = torch.stack([p for p in probabilities])

    def gather_cross_attention(self, call: AttnCall, grid) -> None:
        state = self.step(call.context)
        sa_all = state.self_attention.pop(_block_of(call.site.local_name), None)
        if sa_all is None or not self._needs_maps():
            return
        for k, r in enumerate(self._conditional_rows(call.query.shape[0])):
            ca = _head_mean_probs(call.query[r], call.key[r], call.scale)  # (N, T)
            self._add_maps(state, k, sa_all[k], ca, grid)

    def _needs_maps(self) -> bool:
        return any(
            (s.box is None and s.mask is None) or (s.reference_box is None and s.reference_mask is None)
            for s in self.subjects
        )

    def _add_maps(self, state: _Step, row: int, sa: torch.Tensor, ca: torch.Tensor, grid) -> None:
        """mean_k SA^k · CA on the subject's tokens (k = 1..4), summed into the step's maps at `grid`."""
        n = len(self.subjects)
        for i, subject in enumerate(self.subjects):
            is_target = row == n
            if row != i and not is_target:
                continue
            indices = subject.token_indices if is_target else subject.reference_token_indices
            indices = [t for t in indices if t < ca.shape[1]]
            if not indices:
                continue
            column = ca[:, indices].max(dim=1).values  # (N,)
            total, power = torch.zeros_like(column), column
            for _ in range(4):
                power = sa @ power
                total = total + power
            found = (total / 4).reshape(grid)
            key = f"{'target' if is_target else 'reference'} {i}"
            if key in state.maps:
                found = torch.nn.functional.interpolate(
                    found[None, None], size=state.maps[key].shape, mode="bilinear", align_corners=False
                )[0, 0]
            state.maps[key] = state.maps.get(key, 0) + found
            state.counts[key] = state.counts.get(key, 0) + 1


@functools.lru_cache(maxsize=64)  # masks found anew each generation: keep the recent layouts
def _segment_layout_pattern(
    query_segments: bytes, key_segments: bytes, subjects: int, isolate: bool, mutual: bool, device: str
):
    """The isolation pattern of one segment layout (int32 segment ids as bytes): a pure function of the
    layout and the settings, shared by every layer, step, row and method object."""
    rule = Segments(subjects).rule(isolate=isolate, mutual=mutual)
    query = torch.frombuffer(bytearray(query_segments), dtype=torch.int32)
    key = torch.frombuffer(bytearray(key_segments), dtype=torch.int32)
    return segment_pattern(rule, query.to(device), key.to(device))


def __getattr__(name: str):
    if name == "DEFAULT_START_LAYER":
        from ..families import FAMILIES

        warnings.warn(
            "attnpack.methods.isolation.DEFAULT_START_LAYER is deprecated: the default start layer is the "
            "family's `deep_layers_start`",
            DeprecationWarning,
            stacklevel=2,
        )
        return {name: FAMILIES[name].deep_layers_start for name in IsolationAttention.families}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _image_grid(ctx, image_len: int) -> tuple[int, int] | None:
    if ctx is None or ctx.grid is None:
        return None
    return downsampled_grid(tuple(ctx.grid[-2:]), image_len)


def _rows(mask, rows: int):
    return mask if mask is None or mask.shape[0] == 1 else mask[:rows]


def _block_of(local_name: str) -> str:
    return local_name.rsplit(".", 1)[0]


def _head_mean_probs(query: torch.Tensor, key: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Attention probabilities (Sq, Sk), averaged over heads, float32, one head at a time."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    total = 0
    for h in range(query.shape[1]):
        total = total + ((query[:, h].float() @ key[:, h].float().T) * scale).softmax(-1)
    return total / query.shape[1]


def _without_overlaps(masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Tokens claimed by several subjects go to the largest mask (the public code's post-processing gives
    overlaps to the larger mask)."""
    order = sorted(range(len(masks)), key=lambda i: int(masks[i].sum()))
    out = [m.clone() for m in masks]
    for a_pos, a in enumerate(order):
        for b in order[a_pos + 1 :]:
            out[a] &= ~out[b]
    return out
