"""Context-parallel cases, run by test_parallel.py in 2 or 4 CPU processes (gloo on loopback).

Every rank builds the same tiny denoiser and inputs. Each method runs once in the process without
parallelism (what it must give) and once under diffusers' context parallelism; rank 0 writes what it saw,
case by case, to a JSON file that the tests read.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import traceback

import torch
import torch.distributed as dist

WAN_SPARSE = dict(decay_factor=0.05, block_size=16)
TRAJECTORY = dict(trajectory=[[0, 0.1, 0.5, 0.1, 0.5], [28, 0.5, 0.9, 0.4, 0.9]], rope_steps=1, mask_steps=1)


def cpu_device_count_workaround() -> None:
    """diffusers puts rank r on device r % torch.accelerator.device_count(), which is 0 on a CPU build of
    torch (ZeroDivisionError in enable_parallelism). One device per process is what gloo on a CPU means."""
    if torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1


# ---- tiny denoisers and their inputs


def _seeded(make, seed: int = 0):
    torch.manual_seed(seed)
    return make().eval()


def wan():
    from attnpack.pipelines.tiny import wan_transformer

    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 8, 8, 12, generator=g),  # 8 x 4 x 6 = 192 tokens
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
    )
    return _seeded(wan_transformer), inputs


def flux():
    from attnpack.pipelines.tiny import flux_transformer

    g = torch.Generator().manual_seed(1)
    rows, cols, text = 16, 16, 8
    image_ids = torch.zeros(rows, cols, 3)
    image_ids[..., 1], image_ids[..., 2] = torch.arange(rows)[:, None], torch.arange(cols)[None, :]
    inputs = dict(
        hidden_states=torch.randn(1, rows * cols, 4, generator=g),
        encoder_hidden_states=torch.randn(1, text, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=image_ids.reshape(-1, 3),
        txt_ids=torch.zeros(text, 3),
    )
    return _seeded(flux_transformer), inputs


def hunyuan_video():
    from attnpack.pipelines.tiny import hunyuanvideo_transformer

    g = torch.Generator().manual_seed(1)
    mask = torch.ones(1, 8, dtype=torch.long)
    mask[:, 5:] = 0  # padded text: the second rank's text tokens are padding
    inputs = dict(
        hidden_states=torch.randn(1, 4, 8, 4, 4, generator=g),  # 8 x 4 x 4 = 128 tokens
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 8, 16, generator=g),
        encoder_attention_mask=mask,
        pooled_projections=torch.randn(1, 8, generator=g),
        guidance=torch.tensor([3500.0]),
    )
    return _seeded(hunyuanvideo_transformer), inputs


BUILDERS = {"wan": wan, "flux": flux, "hunyuan_video": hunyuan_video}

# (family, method, settings, sparse: differs from dense)
METHODS = {
    "ulysses": [
        ("wan", "dense", {}, False),
        ("wan", "radial", WAN_SPARSE, True),
        ("wan", "pooled_agent", dict(agent_grid=2), True),
        ("wan", "freenoise", dict(context_length=4, context_stride=2), True),
        ("wan", "freelong", dict(local_window=4, band_windows=()), True),
        ("wan", "trajectory", TRAJECTORY, True),
        ("flux", "dense", {}, False),
        ("flux", "clear", dict(radius=3), True),
        ("flux", "clear", dict(radius=3, down_factor=2), True),
        ("flux", "pooled_agent", dict(agent_grid=2), True),
        ("hunyuan_video", "dense", {}, False),
        ("hunyuan_video", "radial", dict(decay_factor=0.05, block_size=16, sink=False), True),
        ("hunyuan_video", "trajectory", TRAJECTORY, True),
    ],
    "ring": [
        ("wan", "dense", {}, False),
        ("wan", "radial", WAN_SPARSE, True),
        ("wan", "trajectory", TRAJECTORY, True),
        ("flux", "dense", {}, False),
        ("flux", "clear", dict(radius=3), True),
        ("flux", "clear", dict(radius=3, down_factor=2, proportional_attention=True), True),
        ("hunyuan_video", "dense", {}, False),
        ("hunyuan_video", "radial", dict(decay_factor=0.05, block_size=16, sink=False), True),
        ("hunyuan_video", "trajectory", TRAJECTORY, True),
    ],
}
METHODS["ring x ulysses"] = METHODS["ring"]
BACKWARD = [("wan", "radial", WAN_SPARSE), ("flux", "clear", dict(radius=3, down_factor=2))]


def config_of(mode: str, world: int):
    from diffusers import ContextParallelConfig

    if mode == "ulysses":
        return ContextParallelConfig(ulysses_degree=world)
    if mode == "ring":
        return ContextParallelConfig(ring_degree=world)
    return ContextParallelConfig(ring_degree=2, ulysses_degree=world // 2)


def method_of(name: str, settings: dict):
    import attnpack

    method = attnpack.methods.make_method(name, **settings)
    if name == "trajectory":
        method.background_text_len = 4  # Wan's text is [background; foreground], 4 tokens each
    return method


def forward(model, inputs) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


def prepared(model):
    import attnpack

    attnpack.attach(model).set_step(0, 1)
    return model


def single_process(base, inputs, method=None) -> torch.Tensor:
    import attnpack

    model = prepared(copy.deepcopy(base))
    if method is not None:
        attnpack.apply(model, method)
    with torch.no_grad():
        return forward(model, inputs)


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def run_family(family: str, mode: str, world: int, order: str, results: dict) -> None:
    """Every method of `family` in turn on one parallel model; `order`: parallelism "before" or "after" the
    first apply. Then what is left when every method is removed."""
    import attnpack

    base, inputs = BUILDERS[family]()
    stock = single_process(base, inputs)
    model = prepared(copy.deepcopy(base))
    config = config_of(mode, world)
    cases = [case for case in METHODS[mode] if case[0] == family]
    first = None
    if (
        order == "after"
    ):  # applied first, parallelism after: enable_parallelism configures attnpack's processors
        first = attnpack.apply(model, method_of(cases[0][1], cases[0][2]))
    model.enable_parallelism(config=config, cp_plan=attnpack.context_parallel_plan(model))
    for index, (_, name, settings, sparse) in enumerate(cases):
        key = f"{mode}/{family}/{name}/{json.dumps(settings, sort_keys=True)}"
        try:
            expected = single_process(base, inputs, method_of(name, settings))
            handle = (
                first
                if index == 0 and first is not None
                else attnpack.apply(model, method_of(name, settings))
            )
            with torch.no_grad():
                out = forward(model, inputs)
            handle.remove()
            results[key] = dict(
                diff=diff(out, expected), vs_dense=diff(expected, stock), sparse=sparse, order=order
            )
        except Exception as error:  # reported per case; the other ranks raise the same
            results[key] = dict(error=_error(error), trace=traceback.format_exc(limit=6))
    # Every method removed: the stock processors are back, with the model's parallel config.
    processors = model.attn_processors.values()
    configured = [p for p in processors if hasattr(type(p), "_parallel_config")]
    key = f"{mode}/{family}/removed"
    results[key] = dict(
        order=order, configured=all(p._parallel_config is model._parallel_config for p in configured)
    )
    if (
        mode == "ulysses" and family != "hunyuan_video"
    ):  # diffusers' native backend has no ring (no LSE) on CPU
        with torch.no_grad():
            results[key]["diff"] = diff(forward(model, inputs), stock)
    if family == "hunyuan_video":
        try:
            with torch.no_grad():
                forward(model, inputs)
            results[key]["error"] = None
        except Exception as error:
            results[key]["error"] = _error(error)


def run_backward(family: str, mode: str, world: int, name: str, settings: dict, results: dict) -> None:
    """Gradients of every parameter through the parallel attention (summed over the ranks, as data
    parallel training would) against one process."""
    import attnpack

    base, inputs = BUILDERS[family]()
    weight = torch.randn(
        forward(copy.deepcopy(base), inputs).shape, generator=torch.Generator().manual_seed(5)
    )

    def gradients(model) -> dict[str, torch.Tensor]:
        model.zero_grad()
        (forward(model, inputs) * weight).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reference = prepared(copy.deepcopy(base))
    attnpack.apply(reference, method_of(name, settings))
    expected = gradients(reference)
    model = prepared(copy.deepcopy(base))
    model.enable_parallelism(config=config_of(mode, world), cp_plan=attnpack.context_parallel_plan(model))
    attnpack.apply(model, method_of(name, settings))
    key = f"backward/{mode}/{family}/{name}"
    try:
        grads = gradients(model)
        for grad in grads.values():
            dist.all_reduce(grad)
        scale = max(g.abs().max().item() for g in expected.values())
        worst = max(diff(grads[n], expected[n]) for n in expected) / scale
        results[key] = dict(
            relative=worst, parameters=len(expected), missing=sorted(set(expected) - set(grads))
        )
    except Exception as error:
        results[key] = dict(error=_error(error), trace=traceback.format_exc(limit=6))


def run_refusals(world: int, results: dict) -> None:
    """What must raise rather than give a wrong image."""
    import attnpack

    def attempt(key, action):
        try:
            action()
            results[key] = dict(error=None)
        except Exception as error:
            results[key] = dict(error=_error(error))

    base, inputs = wan()
    model = prepared(copy.deepcopy(base))
    model.enable_parallelism(config=config_of("ring", world))
    attempt("refuse/ring/wan/pooled_agent/apply", lambda: attnpack.apply(model, "pooled_agent", agent_grid=2))

    model = prepared(copy.deepcopy(base))
    attnpack.apply(model, "freenoise", context_length=4, context_stride=2)  # parallelism after apply
    model.enable_parallelism(config=config_of("ring", world))
    attempt("refuse/ring/wan/freenoise/forward", lambda: forward(model, inputs))

    base, inputs = flux()
    model = prepared(copy.deepcopy(base))
    model.enable_parallelism(config=config_of("ulysses", world))
    subject = attnpack.Subject("fox", "a fox", box=(0.1, 0.1, 0.5, 0.5), reference_box=(0.2, 0.2, 0.8, 0.8))
    attempt(
        "refuse/ulysses/flux/isolation/apply", lambda: attnpack.apply(model, "isolation", subjects=[subject])
    )


def run_bench(folder: str, results: dict) -> None:
    """`attnpack bench radial --parallel ulysses` on the CPU's tiny model (torchrun's ranks are these)."""
    from attnpack.bench import radial

    try:
        out = radial.run(["tiny"], device="cpu", out=folder, parallel="ulysses", repeats=1)
        results["bench"] = dict(path=str(out))
    except Exception as error:
        results["bench"] = dict(error=_error(error), trace=traceback.format_exc(limit=6))


def main(rank: int, world: int, port: int, suite: str, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cpu_device_count_workaround()
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    results: dict = {}
    try:
        if suite == "2":
            for family, order in (("wan", "after"), ("flux", "before"), ("hunyuan_video", "after")):
                run_family(family, "ulysses", world, order, results)
            for family, order in (("wan", "before"), ("flux", "after"), ("hunyuan_video", "before")):
                run_family(family, "ring", world, order, results)
            for family, name, settings in BACKWARD:
                run_backward(family, "ring", world, name, settings, results)
            run_backward("wan", "ulysses", world, "dense", {}, results)
            run_refusals(world, results)
            run_bench(os.path.dirname(path), results)
        else:
            for family in ("wan", "flux", "hunyuan_video"):
                run_family(family, "ring x ulysses", world, "before", results)
            run_backward("flux", "ring x ulysses", world, "clear", dict(radius=3, down_factor=2), results)
    finally:
        if rank == 0:
            with open(path, "w") as f:
                json.dump(results, f, indent=1)
        dist.destroy_process_group()
