"""Run state lives in each attached pipeline's AttnContext, not on the method object: one method object on
two pipelines keeps two states, and what a pipeline feeds a method travels through the context."""

import pytest
import torch
from helpers import max_diff, tiny_pipeline

import attnpack
from attnpack.methods.isolation import IsolationRun
from attnpack.pipelines import tiny_call_kwargs, trajectory_video

NAME = "tiny-sdxl"
# No boxes: the masks are found from attention maps during one step and used in the next, the state most
# easily shared by mistake.
SUBJECTS = [
    {"name": "fox", "prompt": "a red fox", "token_indices": (3, 4), "reference_token_indices": (3,)},
    {"name": "cat", "prompt": "a black cat", "token_indices": (9,), "reference_token_indices": (9,)},
]
PROMPTS = ["a red fox", "a black cat", "a fox and a cat"]


def generate(pipe, seed: int, **extra) -> torch.Tensor:
    kwargs = tiny_call_kwargs(NAME) | {"num_inference_steps": 3}
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt=PROMPTS, generator=generator, output_type="pt", **kwargs, **extra).images


def test_one_method_on_two_pipelines_keeps_two_states():
    """Pipeline B runs whole in the middle of pipeline A's run, with the same method object: B gives what a
    fresh method object gives, and A what it gives alone."""
    method = attnpack.IsolationAttention(subjects=SUBJECTS, start_layer=0)
    first, second = tiny_pipeline(NAME, seed=0), tiny_pipeline(NAME, seed=1)
    with attnpack.apply(first, method):
        alone = generate(first, seed=0)

    nested = {}

    def run_second(pipe, step, timestep, tensors):
        if step == 0:
            with attnpack.apply(second, method):
                nested["images"] = generate(second, seed=1)
        return tensors

    with attnpack.apply(first, method):
        interleaved = generate(first, seed=0, callback_on_step_end=run_second)
    fresh_method = attnpack.IsolationAttention(subjects=SUBJECTS, start_layer=0)
    with attnpack.apply(second, fresh_method):
        fresh = generate(second, seed=1)

    assert max_diff(nested["images"], fresh) == 0
    assert max_diff(interleaved, alone) == 0
    first_run = attnpack.attach(first).state_for(method, IsolationRun)
    second_run = attnpack.attach(second).state_for(method, IsolationRun)
    assert first_run is not second_run and first_run.found and second_run.found


def test_the_method_keeps_settings_only():
    method = attnpack.IsolationAttention(subjects=SUBJECTS, start_layer=0)
    pipe = tiny_pipeline(NAME)
    with attnpack.apply(pipe, method):
        generate(pipe, seed=0)
    found = attnpack.attach(pipe).state_for(method, IsolationRun).found
    assert {"target 0", "target 1", "reference 0", "reference 1"} <= set(found)
    with pytest.deprecated_call():
        assert method._found is found  # the deprecated view of the latest run
    with pytest.deprecated_call():
        assert method._step.index == 2


def test_multi_subject_output_holds_the_found_masks():
    from attnpack.pipelines import multi_subject

    pipe = tiny_pipeline(NAME)
    subjects = [{"name": "fox", "prompt": "a red fox"}, {"name": "cat", "prompt": "a black cat"}]
    out = multi_subject(
        pipe, subjects, "a fox and a cat", generator=torch.Generator().manual_seed(0),
        method={"start_layer": 0}, **(tiny_call_kwargs(NAME) | {"num_inference_steps": 3}),
    )  # fmt: skip
    assert {"target 0", "target 1", "reference 0", "reference 1"} <= set(out.masks)
    assert all(mask.dtype == torch.bool for mask in out.masks.values())


def test_separated_text_travels_through_the_context(monkeypatch):
    """trajectory_video says in the context which calls carry [background; foreground] text; nothing is
    set on the method, and the text length is reset at every denoiser call."""
    pipe = tiny_pipeline("tiny-wan-t2v")
    ctx = attnpack.attach(pipe)
    seen = []
    pipe.transformer.register_forward_hook(lambda *_: seen.append(ctx.text_parts))
    kwargs = tiny_call_kwargs("tiny-wan-t2v") | {"output_type": "pt", "num_inference_steps": 2}
    out = trajectory_video(
        pipe, trajectory=[[0, 0.1, 0.5, 0.0, 0.4], [8, 0.4, 0.9, 0.5, 1.0]], fg_prompt="a red ball",
        bg_prompt="a green lawn", rope_steps=1, mask_steps=1, **kwargs,
    )  # fmt: skip
    text = kwargs["max_sequence_length"]
    # step 0: conditional pass separated, unconditional plain; step 1 (>= mask_steps): plain
    assert seen == [(text, text), None, None, None]
    assert out.method._background_text_len is None


def test_deprecated_background_text_len_still_separates_the_text():
    """Set by hand (as before), it stands for (n, n) text parts on every call whose text has 2 n tokens."""
    from attnpack.layout import Role, TokenLayout
    from attnpack.methods.base import AttnCall

    method = attnpack.TrajectoryRoPE(trajectory=[[0, 0.1, 0.5, 0.0, 0.4], [8, 0.4, 0.9, 0.5, 1.0]])
    with pytest.deprecated_call():
        method.background_text_len = 4
    with pytest.deprecated_call():
        assert method.background_text_len == 4
    ctx = attnpack.AttnContext()
    ctx.grid, ctx.step_index, ctx.num_steps = (3, 2, 3), 0, 10
    tokens = 18

    def call_with(key_len, parts=None):
        ctx.text_parts = parts
        query = torch.zeros(1, tokens, 1, 1)
        layout = TokenLayout(Role.CROSS, tokens, key_len, grid=ctx.grid)
        return AttnCall(query, torch.zeros(1, key_len, 1, 1), query, layout, None, site=None, context=ctx)

    by_hand = method.sparse_attention(call_with(8)).pattern
    from_context = attnpack.TrajectoryRoPE(trajectory=method.trajectory).sparse_attention(
        call_with(8, (4, 4))
    )
    assert by_hand is not None and torch.equal(by_hand.to_dense(), from_context.pattern.to_dense())
    assert method.sparse_attention(call_with(4)).pattern is None  # plain text: dense
