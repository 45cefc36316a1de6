"""IR-Diffusion isolation + reposition attention: who may see whom, reposition geometry, masks, the
multi-subject pipeline on tiny SDXL and FLUX, and equivalence with plain generation when switched off."""

import json

import numpy as np
import pytest
import torch
from helpers import max_diff, record_calls, tiny_pipeline

import attnpack
from attnpack.methods import isolation as isolation_module
from attnpack.patterns.subjects import (
    Segments,
    box_mask,
    otsu_threshold,
    reposition,
    segment_pattern,
)
from attnpack.pipelines import load_subjects, multi_subject, tiny_call_kwargs

TWO = [
    {
        "name": "fox",
        "prompt": "a red fox",
        "box": (0.0, 0.2, 0.5, 0.9),
        "reference_box": (0.2, 0.2, 0.8, 0.8),
    },
    {
        "name": "cat",
        "prompt": "a black cat",
        "box": (0.5, 0.3, 1.0, 1.0),
        "reference_box": (0.1, 0.1, 0.9, 0.9),
    },
]


# ---- who may see whom


def test_segment_rule_semantics():
    seg = Segments(2)
    allow = seg.rule().allow
    target = [seg.BACKGROUND, seg.TEXT, seg.subject(0), seg.subject(1)]
    for q in (seg.BACKGROUND, seg.TEXT):  # background and text: the target only
        assert allow[q, target].all() and not allow[q, [seg.reference(0), seg.reference(1), seg.HIDDEN]].any()
    s0 = allow[seg.subject(0)]
    assert s0[[seg.BACKGROUND, seg.TEXT, seg.subject(0), seg.reference(0), seg.reference_text(0)]].all()
    assert not s0[[seg.subject(1), seg.reference(1), seg.reference_text(1), seg.HIDDEN]].any()  # isolation
    dropped = allow[seg.dropped(0)]
    assert (
        dropped[[seg.BACKGROUND, seg.subject(0)]].all()
        and not dropped[[seg.reference(0), seg.subject(1)]].any()
    )
    assert not allow[:, seg.HIDDEN].any()
    assert seg.rule(isolate=False).allow[seg.subject(0), seg.subject(1)]
    assert not seg.rule(mutual=False).allow[seg.subject(0), seg.reference(0)]
    with pytest.raises(ValueError, match="at most 7 subjects"):
        Segments(8)


def test_segment_pattern_is_the_rule_on_tokens():
    seg = Segments(2)
    rule = seg.rule()
    torch.manual_seed(0)
    q = torch.randint(1, seg.count, (70,), dtype=torch.int32)
    k = torch.randint(0, seg.count, (90,), dtype=torch.int32)
    pattern = segment_pattern(rule, q, k, blocks=(16, 16))
    assert torch.equal(pattern.to_dense()[0], rule.allow[q.long()][:, k.long()])
    sorted_pattern = segment_pattern(rule, q.sort().values, k.sort().values, blocks=(16, 16))
    assert sorted_pattern.block_density <= 0.75  # sorting by segment leaves whole blocks out


# ---- geometry


def test_box_masks_and_validation():
    mask = box_mask((0.25, 0.5, 0.75, 1.0), (4, 8))
    assert mask.nonzero()[:, 0].unique().tolist() == [2, 3] and mask.nonzero()[:, 1].unique().tolist() == [
        2,
        3,
        4,
        5,
    ]
    assert box_mask((0.0, 0.0, 0.01, 0.01), (4, 4)).sum() == 1  # at least one token
    for box, message in (
        ((0.1, 0.1, 1.2, 0.5), "outside"),
        ((0.5, 0.1, 0.5, 0.6), "empty"),
        ((0.1, 0.2, 0.3), "four numbers"),
    ):
        with pytest.raises(ValueError, match=rf"Subject 'fox': box=.*{message}"):
            attnpack.Subject(name="fox", prompt="a fox", box=box)


def test_reposition_crops_resizes_and_pastes():
    features = torch.arange(6 * 6 * 2, dtype=torch.float32).reshape(6, 6, 2)
    source = torch.zeros(6, 6, dtype=torch.bool)
    source[1:3, 1:4] = True  # 2 x 3
    target = torch.zeros(6, 6, dtype=torch.bool)
    target[2:6, 0:6] = True  # 4 x 6: twice as large
    moved, moved_mask = reposition(features, source, target)
    assert torch.equal(moved_mask, target)
    assert torch.equal(moved[:2], torch.zeros(2, 6, 2))  # a zero canvas outside the box
    crop = features[1:3, 1:4]
    expected = crop.repeat_interleave(2, 0).repeat_interleave(2, 1)  # nearest, doubled
    assert torch.equal(moved[2:6, 0:6], expected)
    source[1, 1] = False  # outside the source mask: zero, and not part of the moved mask
    moved, moved_mask = reposition(features, source, target)
    assert torch.equal(moved[2:4, 0:2], torch.zeros(2, 2, 2)) and not moved_mask[2:4, 0:2].any()
    empty = torch.zeros(6, 6, dtype=torch.bool)
    assert not reposition(features, empty, target)[1].any()


def test_otsu_separates_two_modes():
    values = torch.cat([torch.full((100,), 0.1), torch.full((50,), 0.9)]) + torch.rand(150) * 0.05
    threshold = otsu_threshold(values)
    assert values[:100].max() < threshold < values[100:].min()


# ---- the method on tiny pipelines


def spy_sparse(monkeypatch):
    return record_calls(
        monkeypatch,
        isolation_module,
        "block_sparse_attention",
        lambda q, k, *_, **__: (q.shape[1], k.shape[1]),
    )


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-flux"])
def test_multi_subject_pipeline_runs_with_mutual_attention(name, monkeypatch):
    pipe = tiny_pipeline(name)
    calls = spy_sparse(monkeypatch)
    out = multi_subject(
        pipe, TWO, "a fox and a cat in a park", generator=torch.Generator().manual_seed(0),
        method={"start_layer": 0}, **tiny_call_kwargs(name),
    )  # fmt: skip
    assert out.image.size == out.references[0].size and len(out.references) == 2
    assert out.sheet.width == 3 * out.image.width
    assert any(keys > queries for queries, keys in calls), "the target never read its references"
    assert getattr(pipe, attnpack.api.STATE_ATTR, None) is None


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-flux"])
def test_switched_off_equals_plain_generation(name):
    """One subject, isolation off, blend 0 and every reference read dropped: the target is the plain image
    of the scene prompt from the same noise."""
    pipe = tiny_pipeline(name)
    subject = [dict(TWO[0])]
    kwargs = tiny_call_kwargs(name)
    settings = {"start_layer": 0, "isolate": False, "cross_attention_blend": 0.0, "dropout": 1.0}
    out = multi_subject(
        pipe,
        subject,
        "a fox in a park",
        generator=torch.Generator().manual_seed(0),
        method=settings,
        **kwargs,
    )
    noise = isolation_pipeline_noise(pipe, name, kwargs)
    plain = pipe(prompt=["a red fox", "a fox in a park"], latents=noise, output_type="pt", **kwargs).images[1]
    ours = torch.from_numpy(np.asarray(out.image)).permute(2, 0, 1).float() / 255
    assert max_diff(ours, plain) <= 1 / 255 + 1e-6  # the same image, up to 8-bit rounding


def isolation_pipeline_noise(pipe, name, kwargs):
    from attnpack.pipelines.multi_subject import _start_noise

    is_flux = name == "tiny-flux"
    return _start_noise(pipe, is_flux, 1, kwargs["height"], kwargs["width"], torch.Generator().manual_seed(0))


def test_masks_from_attention_maps(monkeypatch):
    """No boxes: the masks come from SA^k · CA on the subjects' tokens, found during one step for the next."""
    pipe = tiny_pipeline("tiny-sdxl")
    subjects = [{"name": "fox", "prompt": "a red fox"}, {"name": "cat", "prompt": "a black cat"}]
    calls = spy_sparse(monkeypatch)
    out = multi_subject(
        pipe, subjects, "a fox and a cat", generator=torch.Generator().manual_seed(0),
        method={"start_layer": 0}, **(tiny_call_kwargs("tiny-sdxl") | {"num_inference_steps": 3}),
    )  # fmt: skip
    found = out.masks
    assert {"target 0", "target 1", "reference 0", "reference 1"} <= set(found)
    assert all(mask.any() and not mask.all() for mask in found.values())
    assert calls, "the masks were never used"
    assert out.method.subjects[0].token_indices  # found in the scene prompt by the tokenizer


def test_segmenter_and_reference_images():
    pipe = tiny_pipeline("tiny-sdxl")
    kwargs = tiny_call_kwargs("tiny-sdxl")
    seen = []

    def segmenter(image, name):
        seen.append(name)
        mask = torch.zeros(image.height, image.width)
        mask[: image.height // 2] = 1
        return mask

    from PIL import Image

    given = Image.new("RGB", (kwargs["width"], kwargs["height"]), (200, 30, 30))
    subjects = [{"name": "fox", "prompt": "a red fox"}]
    out = multi_subject(
        pipe, subjects, "a fox", references=[given], segmenter=segmenter,
        generator=torch.Generator().manual_seed(0), method={"start_layer": 0}, **kwargs,
    )  # fmt: skip
    assert seen == ["fox", "fox"]  # the reference and the scene of the first, plain pass
    assert out.references[0] is given
    subject = out.method.subjects[0]
    assert subject.mask is not None and subject.reference_mask is not None


def test_bad_input():
    with pytest.raises(ValueError, match=r"subjects=.*non-empty list"):
        attnpack.IsolationAttention(subjects=[])
    with pytest.raises(ValueError, match="names must differ"):
        attnpack.IsolationAttention(subjects=[TWO[0], TWO[0]])
    with pytest.raises(ValueError, match=r"dropout=1\.5"):
        attnpack.IsolationAttention(subjects=TWO, dropout=1.5)
    with pytest.raises(ValueError, match=r"unknown keys \['color'\]"):
        attnpack.IsolationAttention(subjects=[{"name": "fox", "prompt": "a fox", "color": "red"}])
    pipe = tiny_pipeline("tiny-sdxl")
    expected = r"expects \[reference 1 \.\. reference 2, target\]"
    with (
        pytest.raises(ValueError, match=expected),
        attnpack.apply(pipe, attnpack.IsolationAttention(subjects=TWO)),
    ):
        pipe(prompt="a fox", **tiny_call_kwargs("tiny-sdxl"))
    with pytest.raises(ValueError, match="references: 1 given for 2 subjects"):
        multi_subject(pipe, TWO, "a scene", references=[None])


def test_load_subjects(tmp_path):
    path = tmp_path / "subjects.json"
    path.write_text(json.dumps([{"name": "fox", "prompt": "a red fox", "box": [0.1, 0.1, 0.5, 0.5]}]))
    (subject,) = load_subjects(path)
    assert subject.box == (0.1, 0.1, 0.5, 0.5)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read as JSON"):
        load_subjects(path)
    path.write_text(json.dumps([{"name": "fox", "prompt": "a fox", "box": [0.5, 0.5, 0.2, 0.9]}]))
    with pytest.raises(ValueError, match=r"box=.*empty"):
        load_subjects(path)


def test_target_mask_on_a_real_layer_matches_the_definition(monkeypatch):
    """The first mutual self-attention call of tiny SDXL: the kernel's mask, token by token, is what the
    boxes say: subject i sees reference i inside its moved mask, the target but subject j; background sees
    the target only."""
    from attnpack.patterns.subjects import box_mask, reposition

    seen = record_calls(
        monkeypatch,
        isolation_module,
        "block_sparse_attention",
        lambda q, k, v, pattern, **_: (q.shape[1], pattern),
    )
    pipe = tiny_pipeline("tiny-sdxl")
    kwargs = tiny_call_kwargs("tiny-sdxl") | {"num_inference_steps": 1}
    multi_subject(
        pipe, TWO, "a fox and a cat", generator=torch.Generator().manual_seed(0),
        method={"start_layer": 0, "dropout": 0.0}, **kwargs,
    )  # fmt: skip
    tokens, pattern = seen[0]
    grid = next((h, w) for h, w in ((16, 24), (8, 12), (4, 6)) if h * w == tokens)
    targets = [box_mask(s["box"], grid) for s in TWO]
    moved = [
        reposition(torch.zeros(*grid, 1), box_mask(s["reference_box"], grid), t)[1].flatten()
        for s, t in zip(TWO, targets, strict=True)
    ]
    targets = isolation_module._without_overlaps(targets)
    flat = [t.flatten() for t in targets]
    expected = torch.zeros(tokens, 3 * tokens, dtype=torch.bool)
    for p in range(tokens):
        inside = [i for i in range(2) if flat[i][p]]
        target_keys = torch.ones(tokens, dtype=torch.bool)
        for i in inside:
            for j in range(2):
                if j != i:
                    target_keys &= ~flat[j]
            expected[p, i * tokens : (i + 1) * tokens] = moved[i]
        expected[p, 2 * tokens :] = target_keys
    assert torch.equal(pattern.to_dense()[0].cpu(), expected)


@pytest.mark.gpu
def test_gpu_multi_subject_in_half_precision():
    pipe = tiny_pipeline("tiny-sdxl").to("cuda", torch.float16)
    out = multi_subject(
        pipe, TWO, "a fox and a cat", generator=torch.Generator("cuda").manual_seed(0),
        method={"start_layer": 0}, **tiny_call_kwargs("tiny-sdxl"),
    )  # fmt: skip
    assert np.isfinite(np.asarray(out.image, dtype=np.float32)).all()
