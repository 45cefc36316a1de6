"""What processors see: token layouts per family and role, and the context's step counting."""

from collections import defaultdict
from dataclasses import dataclass, field

import pytest
from helpers import run_tiny, tiny_pipeline

import attnpack
from attnpack import Role, TokenLayout
from attnpack.layout import downsampled_grid


@dataclass(eq=False, repr=False)
class RecordingDense(attnpack.DenseAttention):
    """Dense attention that writes down what every call saw."""

    seen: list = field(default_factory=list)

    def attend(self, call):
        ctx = call.context
        self.seen.append((call.site.name, call.layout, ctx.step_index, ctx.num_steps, call.query.shape))
        return super().attend(call)


def record(name: str, **overrides):
    pipe = tiny_pipeline(name)
    method = RecordingDense()
    attnpack.apply(pipe, method)
    run_tiny(pipe, name, **overrides)
    return pipe, method.seen


def layouts_by_role(seen) -> dict[Role, set[TokenLayout]]:
    found = defaultdict(set)
    for _, layout, *_ in seen:
        found[layout.role].add(layout)
    return found


def test_unet_levels_and_cross_attention():
    # 32 x 48 px -> 16 x 24 latent; attention at 16 x 24 and 8 x 12
    _, seen = record("tiny-sd1.5")
    found = layouts_by_role(seen)
    assert {layout.grid for layout in found[Role.SELF]} == {(16, 24), (8, 12)}
    assert {(layout.grid, layout.key_len) for layout in found[Role.CROSS]} == {((16, 24), 77), ((8, 12), 77)}
    assert all(layout.batch_grid is None for layout in found[Role.SELF])


def test_sdxl_has_no_full_resolution_attention():
    _, seen = record("tiny-sdxl")
    assert {layout.grid for layout in layouts_by_role(seen)[Role.SELF]} == {(8, 12)}


def test_animatediff_spatial_and_temporal():
    _, seen = record("tiny-animatediff")  # 4 frames
    found = layouts_by_role(seen)
    assert {(layout.grid, layout.batch_grid) for layout in found[Role.SELF]} == {
        ((16, 24), (4,)),
        ((8, 12), (4,)),
    }
    temporal = {(layout.grid, layout.batch_grid) for layout in found[Role.TEMPORAL]}
    assert temporal == {((4,), (16, 24)), ((4,), (8, 12))}


def test_flux_double_and_single_stream():
    # 16 x 24 px, VAE factor 1, 2 x 2 packing -> 8 x 12 tokens after 16 text tokens
    _, seen = record("tiny-flux")
    layouts = {layout for _, layout, *_ in seen}
    assert layouts == {TokenLayout(Role.JOINT, 16 + 96, 16 + 96, grid=(8, 12), text_len=16, text_first=True)}
    names = {name for name, *_ in seen}
    assert any("single_transformer_blocks" in name for name in names)
    assert any(".transformer_blocks." in name for name in names)
    layout = next(iter(layouts))
    assert layout.text_slice == slice(0, 16) and layout.visual_slice == slice(16, 112)


@pytest.mark.parametrize("name", ["tiny-wan-t2v", "tiny-wan-i2v"])
def test_wan_self_and_cross(name):
    # 9 frames -> 3 latent frames; 32 x 48 px -> 4 x 6 latent -> 2 x 3 tokens (patch 2)
    _, seen = record(name)
    found = layouts_by_role(seen)
    assert {layout.grid for layout in found[Role.SELF]} == {(3, 2, 3)}
    text_len = 512 if name == "tiny-wan-i2v" else 16
    assert {(layout.grid, layout.key_len) for layout in found[Role.CROSS]} == {((3, 2, 3), text_len)}


def test_wan_i2v_image_context_reaches_the_method():
    pipe = tiny_pipeline("tiny-wan-i2v")
    contexts = []

    @dataclass(eq=False, repr=False)
    class Probe(attnpack.DenseAttention):
        def attend_context(self, call, key, value):
            contexts.append(key.shape)
            return super().attend_context(call, key, value)

    attnpack.apply(pipe, Probe())
    run_tiny(pipe, "tiny-wan-i2v")
    # CLIP at 32 px with 4 px patches: 64 patches + class token
    assert contexts and {shape[1] for shape in contexts} == {65}


def test_cogvideox_text_first():
    _, seen = record("tiny-cogvideox")
    layouts = {layout for _, layout, *_ in seen}
    assert layouts == {
        TokenLayout(Role.JOINT, 16 + 18, 16 + 18, grid=(3, 2, 3), text_len=16, text_first=True)
    }


def test_hunyuan_video_text_last_and_refiner():
    # 16 x 32 px -> 2 x 4 latent, patch 1; 9 frames -> 3
    _, seen = record("tiny-hunyuanvideo")
    found = layouts_by_role(seen)
    assert found[Role.JOINT] == {
        TokenLayout(Role.JOINT, 24 + 16, 24 + 16, grid=(3, 2, 4), text_len=16, text_first=False)
    }
    joint = next(iter(found[Role.JOINT]))
    assert joint.visual_slice == slice(0, 24) and joint.text_slice == slice(24, 40)
    assert {layout.text_len for layout in found[Role.TEXT]} == {16}


def test_steps_counted_once_per_scheduler_step():
    # Wan runs the transformer twice per step (conditional, unconditional): still one step each.
    _, seen = record("tiny-wan-t2v", num_inference_steps=3)
    steps = sorted({(step, total) for _, _, step, total, _ in seen})
    assert steps == [(0, 3), (1, 3), (2, 3)]


def test_steps_with_batched_guidance_and_a_second_run():
    pipe, seen = record("tiny-sd1.5", num_inference_steps=4)
    first = sorted({step for _, _, step, *_ in seen})
    seen.clear()
    run_tiny(pipe, "tiny-sd1.5", num_inference_steps=4)
    assert sorted({step for _, _, step, *_ in seen}) == first
    assert first[0] == 0 and first == list(range(len(first)))


def test_steps_follow_a_replaced_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    pipe, seen = record("tiny-sd1.5")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    seen.clear()
    run_tiny(pipe, "tiny-sd1.5", num_inference_steps=3)
    assert sorted({(step, total) for _, _, step, total, _ in seen}) == [(0, 3), (1, 3), (2, 3)]


def test_layer_indices_in_forward_order():
    pipe, seen = record("tiny-sd1.5", num_inference_steps=1)
    ctx = attnpack.attach(pipe)
    order = [name for name, *_ in seen[: len(ctx.sites)]]  # one denoiser call (batched guidance)
    assert order == [site.name for site in ctx.sites]
    assert [site.index for site in ctx.sites] == list(range(len(ctx.sites)))
    # down: 2 levels, mid: 1, up: 2 levels x 2 layers
    assert ctx.count_of(Role.SELF) == ctx.count_of(Role.CROSS) == 7
    assert [site.role_index for site in ctx.sites if site.role is Role.SELF] == list(range(7))
    assert [site.name.split(".")[1] for site in ctx.sites if site.role is Role.SELF] == [
        "down_blocks"
    ] * 2 + ["mid_block"] + ["up_blocks"] * 4


def test_manual_steps():
    pipe = tiny_pipeline("tiny-flux")
    ctx = attnpack.attach(pipe)
    ctx.set_step(3, 10)
    assert ctx.step_fraction == 0.3
    run_tiny(pipe, "tiny-flux")
    assert (ctx.step_index, ctx.num_steps) == (3, 10)  # the scheduler no longer moves it
    with pytest.raises(ValueError, match="step_index=10"):
        ctx.set_step(10, 10)
    with pytest.raises(ValueError, match="num_steps=0"):
        ctx.set_step(0, 0)


@pytest.mark.parametrize(
    ("full", "tokens", "expected"),
    [
        ((16, 24), 384, (16, 24)),
        ((16, 24), 96, (8, 12)),
        ((9, 13), 35, (5, 7)),
        ((9, 13), 12, (3, 4)),
        ((8, 8), 10, None),
    ],
)
def test_downsampled_grid(full, tokens, expected):
    assert downsampled_grid(full, tokens) == expected


def test_layout_checks_its_grid():
    with pytest.raises(ValueError, match="grid"):
        TokenLayout(Role.SELF, 10, 10, grid=(3, 3))


def test_two_denoisers_share_one_context():
    """Wan 2.2: both experts are attached, each layer knows which denoiser it is in, steps run across both."""
    pipe, seen = record("tiny-wan2.2")
    ctx = attnpack.attach(pipe)
    assert {site.name.split(".")[0] for site in ctx.sites} == {"transformer", "transformer_2"}
    used = sorted({(name.split(".")[0], step) for name, _, step, *_ in seen})
    experts = {expert for expert, _ in used}
    assert experts == {"transformer", "transformer_2"}, used  # boundary 0.9: the first step is high-noise
    assert sorted({step for _, step in used}) == [0, 1, 2]


def test_sd3_image_first_and_dual_attention():
    # 32 x 48 px, VAE factor 1, patch 2: 16 x 24 tokens; text: 77 CLIP + 16 T5 tokens
    _, seen = record("tiny-sd3")
    found = layouts_by_role(seen)
    assert found[Role.JOINT] == {
        TokenLayout(Role.JOINT, 384 + 93, 384 + 93, grid=(16, 24), text_len=93, text_first=False)
    }
    assert found[Role.SELF] == {TokenLayout(Role.SELF, 384, 384, grid=(16, 24))}
