"""attach / apply / remove: how attnpack goes into a pipeline and comes out again without a trace."""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from . import parallel
from .context import SITE_ATTR, AttentionSite, AttnContext, DenoiserHook, StepCounter
from .fallback import CoverageReport, warn_once
from .families import FAMILIES, Family, family_of
from .families.base import processor_of
from .methods import AttentionMethod, make_method

logger = logging.getLogger("attnpack")

DENOISER_ATTRIBUTES = ("transformer", "transformer_2", "unet")
STATE_ATTR = "_attnpack"


@dataclass(eq=False)
class Attachment:
    """What `attach` put into a pipeline, so that `remove` can take all of it out."""

    context: AttnContext
    denoisers: dict[str, tuple[torch.nn.Module, Family]]
    modules: list[tuple[torch.nn.Module, AttentionSite]]
    hooks: list[Any]
    steps: StepCounter | None
    handles: list[Handle] = field(default_factory=list)

    def site_of(self, module: torch.nn.Module) -> AttentionSite | None:
        return next((site for m, site in self.modules if m is module), None)


def carry_attention_backend(source: Any, target: Any) -> None:
    """Hand the diffusers attention backend that `set_attention_backend` gave `source` to `target`, the
    processor that replaces it, so that a backend set (or reset) before `apply` or before `remove` stays so."""
    if hasattr(source, "_attention_backend") and hasattr(target, "_attention_backend"):
        target._attention_backend = source._attention_backend


def restore_processor(module: torch.nn.Module, site: AttentionSite | None, processor: Any) -> None:
    """Put a processor back, on the attention backend its replacement ran on; under diffusers' context
    parallelism it gets the model's config, which `enable_parallelism` gave only to the processors installed
    when it ran (attnpack's, if it came after)."""
    carry_attention_backend(processor_of(module), processor)
    module.set_processor(processor)
    config = parallel.context_parallel_config(site.denoiser_model if site is not None else None)
    if (
        config is not None
        and config.context_parallel_config is not None
        and hasattr(processor, "_parallel_config")
    ):
        processor._parallel_config = config


def attach(pipe) -> AttnContext:
    """Install attnpack's context hooks on a pipeline (or a bare denoiser). Idempotent.

    Returns the `AttnContext` the pipeline's attention layers share. After this,
    `pipe.transformer.set_attn_processor(attnpack.SomeMethod(...))` works as well as `attnpack.apply`.
    """
    attachment = getattr(pipe, STATE_ATTR, None)
    if attachment is not None:
        return attachment.context

    denoisers = find_denoisers(pipe)
    context = AttnContext()
    is_pipeline = not isinstance(pipe, torch.nn.Module)
    steps = StepCounter(pipe, context) if is_pipeline else None
    modules: list[tuple[torch.nn.Module, AttentionSite]] = []
    hooks = []
    for attr, (model, family) in denoisers.items():
        role_counts: dict = {}
        index = 0
        for name, module in family.attention_modules(model):
            processor = processor_of(module)
            # An attnpack method already on the module (set before attach) stands in for the stock processor.
            is_method = isinstance(processor, AttentionMethod)
            found = family.classify(name, module, None if is_method else processor)
            if found is None:
                logger.info(
                    "attnpack leaves %s.%s alone: %s with %s is not a processor attnpack reproduces",
                    attr,
                    name,
                    type(module).__name__,
                    type(processor).__name__,
                )
                continue
            adapter, role = found
            site = AttentionSite(
                name=f"{attr}.{name}" if is_pipeline else name,
                local_name=name,
                denoiser=attr,
                family=family,
                adapter=adapter,
                role=role,
                index=index,
                role_index=role_counts.get(role, 0),
                context=context,
                stock_processor=adapter.default_processor() if is_method else processor,
                model=weakref.ref(model),
            )
            index += 1
            role_counts[role] = role_counts.get(role, 0) + 1
            modules.append((module, site))
        hooks.append(
            model.register_forward_pre_hook(DenoiserHook(context, family, attr, steps), with_kwargs=True)
        )
        report = CoverageReport(context.coverage, attr)
        hooks.append(model.register_forward_pre_hook(report.start, with_kwargs=True))
        hooks.append(model.register_forward_hook(report.end, with_kwargs=True))

    for module, site in modules:
        setattr(module, SITE_ATTR, site)
    context.sites = [site for _, site in modules]
    if steps is not None:
        steps.refresh()
    setattr(pipe, STATE_ATTR, Attachment(context, denoisers, modules, hooks, steps))
    return context


def apply(pipe, method: str | AttentionMethod, **config: Any) -> Handle:
    """Swap `method` into every attention layer of `pipe` whose family and role it acts on.

    `method` is a name ("dense", ...) with its settings as keywords, or a method object. Layers the method
    does not act on keep their processors. Returns a `Handle`; `handle.remove()` (or leaving a
    `with attnpack.apply(...):` block) puts the exact original processor objects back.
    """
    method = make_method(method, **config)
    attach(pipe)
    attachment: Attachment = getattr(pipe, STATE_ATTR)
    targets = [module for module, site in attachment.modules if method.acts_on(site.family.name, site.role)]
    if not targets:
        found = ", ".join(
            f"{attr}: {type(model).__name__} ({family.name})"
            for attr, (model, family) in attachment.denoisers.items()
        )
        roles = sorted(role.value for role in method.roles)
        raise ValueError(
            f"{type(method).__name__} ({method.name!r}) acts on the families {list(method.families)} "
            f"(layer roles {roles}); this pipeline has {found}, with no such layer"
        )
    sites = dict(attachment.modules)
    idle = {module: method.idle_reason(sites[module]) for module in targets}
    targets = [module for module in targets if idle[module] is None]
    if not targets:
        reasons = sorted(set(idle.values()))
        warn_once(
            ("apply", method.name, *reasons),
            "attnpack.apply: %r acts on no layer of this pipeline, so nothing was installed (%d layers of its "
            "families and roles, each idle: %s)",
            method.name,
            len(idle),
            "; ".join(reasons),
        )
    for (
        module
    ) in targets:  # under diffusers' parallelism: refuse what would be wrong, before changing anything
        site = sites[module]
        config = parallel.context_parallel_config(site.denoiser_model)
        if config is not None:
            parallel.check_supported(method, site.family, site.role, config)
    processors = {module: method.processor_for(module, sites[module]) for module in targets}
    undo = method.install(processors, {attr: model for attr, (model, _) in attachment.denoisers.items()})
    handle = Handle(attachment, method, {}, undo)
    for module, processor in processors.items():
        handle.replaced[module] = module.processor
        handle.installed[module] = processor
        carry_attention_backend(module.processor, processor)
        module.set_processor(processor)
    attachment.handles.append(handle)
    return handle


def remove(pipe) -> bool:
    """Take attnpack out of `pipe` entirely: every method it applied, processors set directly with
    `set_attn_processor` after `attach`, the context hooks and every attribute it set. Returns False if
    attnpack was not attached."""
    attachment: Attachment | None = getattr(pipe, STATE_ATTR, None)
    if attachment is None:
        return False
    for attr, (model, family) in attachment.denoisers.items():
        config = parallel.context_parallel_config(model)
        if config is not None and family.name == "hunyuan_video":
            raise RuntimeError(
                f"attnpack.remove: {attr} is a HunyuanVideo model under {parallel.describe(config)}, which "
                "diffusers' own HunyuanVideo processors cannot run (their text mask is wrong on every rank but "
                "the first); attnpack stays in. Remove single methods with handle.remove() and keep "
                "attnpack.apply(pipe, 'dense'), which reproduces the stock processor exactly"
            )
    for handle in reversed(list(attachment.handles)):
        handle.remove()
    for module, site in attachment.modules:
        if isinstance(processor_of(module), AttentionMethod):
            restore_processor(module, site, site.stock_processor)
        if getattr(module, SITE_ATTR, None) is site:
            delattr(module, SITE_ATTR)
    for hook in attachment.hooks:
        hook.remove()
    if attachment.steps is not None:
        attachment.steps.unwrap()
    delattr(pipe, STATE_ATTR)
    return True


class Handle:
    """One `apply`: the processors it replaced, so that `remove()` can put them back."""

    def __init__(self, attachment: Attachment, method: AttentionMethod, replaced: dict, undo=None):
        self.attachment = attachment
        self.method = method
        self.replaced: dict[torch.nn.Module, Any] = replaced
        self.installed: dict[torch.nn.Module, Any] = {}  # what this apply put on each module
        self.undo = undo  # reverses the method's model-level changes (weights, rotary embedding)
        self.removed = False

    @property
    def num_layers(self) -> int:
        """How many attention layers this apply put the method on (0: it acts on none of them)."""
        return len(self.installed)

    @property
    def layers(self) -> list[str]:
        """The names of those layers ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1", ...)."""
        return [self.attachment.site_of(module).name for module in self.installed]

    def remove(self) -> None:
        """Put back what this apply replaced. Applies stack: removing one in the middle hands its
        originals to the apply that came after it."""
        if self.removed:
            return
        handles = self.attachment.handles
        for module, previous in self.replaced.items():
            later = [h for h in handles[handles.index(self) + 1 :] if module in h.replaced]
            if later:
                later[0].replaced[module] = previous
            elif module.processor is self.installed[module]:
                restore_processor(module, self.attachment.site_of(module), previous)
        if self.undo is not None:
            self.undo()
        handles.remove(self)
        self.removed = True

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else f"on {self.num_layers} layers"
        return f"<attnpack.Handle {self.method!r}: {state}>"


def find_denoisers(pipe) -> dict[str, tuple[torch.nn.Module, Family]]:
    """The pipeline's denoisers that attnpack supports, by attribute name."""
    if pipe is None or isinstance(pipe, (str, bytes, int, float)):
        raise TypeError(
            f"pipe={pipe!r} ({type(pipe).__name__}) must be a diffusers pipeline or a denoiser model "
            "(a transformer or UNet)"
        )
    if isinstance(pipe, torch.nn.Module):
        candidates = {type(pipe).__name__: pipe}
    else:
        candidates = {attr: getattr(pipe, attr, None) for attr in DENOISER_ATTRIBUTES}
        candidates = {attr: model for attr, model in candidates.items() if model is not None}
        if not candidates:
            raise ValueError(
                f"pipe: {type(pipe).__name__} has no denoiser; attnpack expects a `transformer`, "
                f"`transformer_2` or `unet` component"
            )
    found, unsupported = {}, []
    for attr, model in candidates.items():
        model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
        family = family_of(model)
        if family is None:
            unsupported.append(f"{attr}: {type(model).__name__}")
        else:
            found[attr] = (model, family)
    if not found:
        supported = ", ".join(
            f"{family.name} ({', '.join(family.denoiser_classes)})" for family in FAMILIES.values()
        )
        raise ValueError(
            f"pipe: no attnpack family supports {', '.join(unsupported)}; supported families: {supported}"
        )
    return found
