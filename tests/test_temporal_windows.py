"""FreeNoise and FreeLong on AnimateDiff: windows, weights and noise against hand-computed cases, the
diffusers cross-check, SpectralBlend and local windows against plain torch, stock equivalence, long videos."""

import math

import pytest
import torch
from helpers import max_diff, run_tiny, tiny_pipeline

import attnpack
from attnpack.kernels import global_local_attention, local_window_attention, windowed_attention
from attnpack.methods.freelong import gaussian_low_pass, spectral_blend
from attnpack.methods.freenoise import reschedule_noise, window_weights
from attnpack.methods.temporal import POSITIONS_ATTR, DeferredPositions, frame_windows
from attnpack.pipelines import frame_embeddings, keyframe_prompts, long_video, tiny_call_kwargs

NAME = "tiny-animatediff"


def naive_attention(q, k, v, scale=None):
    """(B, S, H, D) softmax attention in float64."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double())


def call_kwargs(**overrides):
    kwargs = tiny_call_kwargs(NAME) | overrides
    kwargs.pop("num_frames", None)
    return kwargs


# ---- windows, weights, noise


def test_window_weights_by_hand():
    assert window_weights(5, "pyramid").tolist() == [1, 2, 3, 2, 1]
    assert window_weights(4, "pyramid").tolist() == [1, 2, 2, 1]
    assert window_weights(3, "flat").tolist() == [1, 1, 1]
    assert window_weights(4, "delayed_reverse_sawtooth").tolist() == pytest.approx([0.01, 2, 2, 1])
    # diffusers returns six weights for five frames here; the documented scheme is five
    assert window_weights(5, "delayed_reverse_sawtooth").tolist() == pytest.approx([0.01, 0.01, 3, 2, 1])
    with pytest.raises(ValueError, match="weighting='cosine'"):
        window_weights(4, "cosine")


@pytest.mark.parametrize("length", [4, 5, 16])
@pytest.mark.parametrize("weighting", ["pyramid", "flat"])
def test_window_weights_match_diffusers(length, weighting):
    from diffusers.models.attention import FreeNoiseTransformerBlock

    block = FreeNoiseTransformerBlock.__new__(FreeNoiseTransformerBlock)
    assert window_weights(length, weighting).tolist() == block._get_frame_weights(length, weighting)


def test_frame_windows_by_hand():
    assert frame_windows(24, 16, 4) == [(0, 16), (4, 20), (8, 24)]
    assert frame_windows(25, 16, 4) == [(0, 16), (4, 20), (8, 24), (9, 25)]  # one more, ending at the last
    assert frame_windows(10, 16, 4) == [(0, 10)]


def test_windowed_attention_matches_a_loop():
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 11, 2, 8) for _ in range(3))
    offsets = tuple(torch.randn(4, 2, 8) for _ in range(3))
    windows = frame_windows(11, 4, 3)
    weights = window_weights(4, "pyramid")
    out = windowed_attention(q, k, v, windows, weights, offsets=offsets)
    total = torch.zeros(11, dtype=torch.float64)
    fused = torch.zeros(3, 11, 2, 8, dtype=torch.float64)
    for start, end in windows:
        qw, kw, vw = (x[:, start:end] + o for x, o in zip((q, k, v), offsets, strict=True))
        fused[:, start:end] += naive_attention(qw, kw, vw) * weights.double()[None, :, None, None]
        total[start:end] += weights.double()
    assert max_diff(out, fused / total[None, :, None, None]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "frames, length, stride, dim, with_offsets",
    [(11, 4, 3, 8, True), (25, 16, 4, 40, True), (40, 16, 4, 64, False), (7, 16, 4, 24, True)],
)
def test_windowed_kernel_matches_reference(frames, length, stride, dim, with_offsets, dtype):
    torch.manual_seed(3)
    q, k, v = (torch.randn(3, frames, 2, dim).to(dtype) for _ in range(3))
    windows = frame_windows(frames, length, stride)
    window = windows[0][1] - windows[0][0]
    offsets = tuple(torch.randn(window, 2, dim).to(dtype) for _ in range(3)) if with_offsets else None
    weights = window_weights(window, "pyramid")
    out = windowed_attention(q, k, v, windows, weights, offsets=offsets, backend="triton")
    expected = windowed_attention(
        q.float(),
        k.float(),
        v.float(),
        windows,
        weights,
        offsets=offsets and tuple(o.float() for o in offsets),
        backend="reference",
    )
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert out.dtype == dtype and max_diff(out, expected) < tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "frames, window, dim, with_offsets",
    [(9, 4, 8, True), (24, 16, 40, True), (40, 16, 64, False), (64, 16, 80, True), (17, 17, 16, True)],
)
def test_global_local_kernel_matches_reference(frames, window, dim, with_offsets, dtype):
    torch.manual_seed(6)
    q, k, v = (torch.randn(2, frames, 2, dim).to(dtype) for _ in range(3))
    offsets = {}
    if with_offsets:
        offsets = {
            "global_offsets": tuple(torch.randn(frames, 2, dim) for _ in range(3)),
            "local_offsets": tuple(torch.randn(window, 2, dim) for _ in range(3)),
        }
    out_g, out_l = global_local_attention(q, k, v, window, backend="triton", **offsets)
    ref_g, ref_l = global_local_attention(
        q.float(), k.float(), v.float(), window, backend="reference", **offsets
    )
    tolerance = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}[dtype]
    assert max_diff(out_g, ref_g) < tolerance and max_diff(out_l, ref_l) < tolerance


def test_windowed_attention_rejects_bad_windows():
    q = torch.randn(1, 8, 1, 4)
    with pytest.raises(ValueError, match="equal-length"):
        windowed_attention(q, q, q, [(0, 4), (4, 7)], torch.ones(4))
    with pytest.raises(ValueError, match="weights must hold 4 values"):
        windowed_attention(q, q, q, [(0, 4), (4, 8)], torch.ones(3))
    with pytest.raises(ValueError, match=r"window=9 must be an integer in \[1, 8\]"):
        global_local_attention(q, q, q, 9)
    with pytest.raises(ValueError, match="both global_offsets and local_offsets"):
        global_local_attention(q, q, q, 4, global_offsets=(q[0], q[0], q[0]))


def test_reschedule_noise_by_hand():
    noise = torch.randn(2, 3, 8, 2, 2)
    shuffled = reschedule_noise(noise, 4, 2, "shuffle", torch.Generator().manual_seed(0))
    assert torch.equal(shuffled[:, :, :4], noise[:, :, :4])
    for start, source in ((4, [0, 1]), (6, [2, 3])):  # each chunk: a permutation of the window before
        chunk = shuffled[:, :, start : start + 2]
        originals = [noise[:, :, s] for s in source]
        for i in range(2):
            assert any(torch.equal(chunk[:, :, i], o) for o in originals)
        assert not torch.equal(chunk[:, :, 0], chunk[:, :, 1])
    repeated = reschedule_noise(noise, 3, 2, "repeat")
    assert torch.equal(repeated[:, :, 3:6], noise[:, :, :3]) and torch.equal(
        repeated[:, :, 6:], noise[:, :, :2]
    )
    assert torch.equal(reschedule_noise(noise, 4, 2, "random"), noise)
    with pytest.raises(ValueError, match="mode='repeat_context'"):
        reschedule_noise(noise, 4, 2, "repeat_context")


def test_reschedule_noise_with_a_generator_per_video():
    noise = torch.randn(2, 1, 12, 1, 1)
    generators = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    together = reschedule_noise(noise, 4, 2, "shuffle", generators)
    for b, seed in enumerate((1, 2)):
        alone = reschedule_noise(noise[b : b + 1], 4, 2, "shuffle", torch.Generator().manual_seed(seed))
        assert torch.equal(together[b : b + 1], alone)
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        reschedule_noise(noise, 4, 2, "shuffle", [*generators, torch.Generator()])


# ---- cross-check with diffusers' FreeNoise


@pytest.mark.parametrize("num_frames", [16, 24, 27])
def test_noise_matches_diffusers_free_noise(num_frames):
    from diffusers.utils.torch_utils import randn_tensor

    pipe = tiny_pipeline(NAME)
    pipe.enable_free_noise(context_length=16, context_stride=4)
    theirs = pipe._prepare_latents_free_noise(
        1, 4, num_frames, 32, 48, torch.float32, "cpu", torch.Generator().manual_seed(7)
    )
    generator = torch.Generator().manual_seed(7)
    shape = (1, 4, num_frames, 32 // pipe.vae_scale_factor, 48 // pipe.vae_scale_factor)
    ours = reschedule_noise(randn_tensor(shape, generator=generator), 16, 4, "shuffle", generator)
    assert torch.equal(ours, theirs)


def test_prompt_interpolation_matches_diffusers():
    pipe = tiny_pipeline(NAME)
    pipe.enable_free_noise(context_length=16, context_stride=4)
    prompts = {0: "a red fox", 10: "a blue fox", 20: "a green fox"}
    theirs, _ = pipe._encode_prompt_free_noise(prompts, 32, "cpu", 1, False)
    keyframes, _ = pipe.encode_prompt(list(prompts.values()), "cpu", 1, False)
    ours = frame_embeddings(keyframes, list(prompts), 32)
    assert ours.shape == theirs.shape and max_diff(ours, theirs) < 1e-6


def test_one_window_equals_diffusers_free_noise_and_stock():
    """Where the video fits one window, diffusers' FreeNoise, ours and the stock pipeline agree."""
    pipe = tiny_pipeline(NAME)
    stock = run_tiny(pipe, NAME)
    with attnpack.apply(pipe, attnpack.FreeNoiseAttention(context_length=16)):
        ours = run_tiny(pipe, NAME)
    pipe.enable_free_noise(context_length=4, context_stride=4, noise_type="random")
    theirs = run_tiny(pipe, NAME)
    pipe.disable_free_noise()
    assert max_diff(ours, stock) < 1e-5 and max_diff(theirs, stock) < 1e-5


# 40 frames with pyramid weights is left out: diffusers counts the last, shifted window's weights wrongly there
@pytest.mark.parametrize("weighting, num_frames", [("pyramid", 24), ("flat", 24), ("flat", 40)])
def test_block_fusion_equals_diffusers_free_noise(weighting, num_frames):
    """fusion="block" is diffusers' scheme: same noise, same output, where diffusers fuses every window
    fully (windows that tile the video, or flat weights)."""
    pipe = tiny_pipeline(NAME)
    kwargs = {"num_frames": num_frames}
    noise = torch.randn(1, 4, num_frames, 32 // pipe.vae_scale_factor, 48 // pipe.vae_scale_factor)
    with attnpack.apply(
        pipe, attnpack.FreeNoiseAttention(context_length=16, weighting=weighting, fusion="block")
    ):
        ours = run_tiny(pipe, NAME, latents=noise.clone(), **kwargs)
    pipe.enable_free_noise(context_length=16, context_stride=4, weighting_scheme=weighting)
    theirs = run_tiny(pipe, NAME, latents=noise.clone(), **kwargs)
    pipe.disable_free_noise()
    assert max_diff(ours, theirs) < 1e-5
    with attnpack.apply(pipe, attnpack.FreeNoiseAttention(context_length=16, weighting=weighting)):
        per_attention = run_tiny(pipe, NAME, latents=noise.clone(), **kwargs)
    assert max_diff(per_attention, theirs) > 1e-4  # the paper's per-attention fusion is another scheme


# ---- the diffusers bugs the issue names, handled here


def test_context_length_none_reads_the_adapters_length():
    pipe = tiny_pipeline(NAME)  # motion_max_seq_length = 32
    kwargs = dict(num_frames=40, num_inference_steps=1)
    with attnpack.apply(pipe, attnpack.FreeNoiseAttention(context_length=None)):
        from_adapter = run_tiny(pipe, NAME, **kwargs)
    with attnpack.apply(pipe, attnpack.FreeNoiseAttention(context_length=32)):
        explicit = run_tiny(pipe, NAME, **kwargs)
    assert max_diff(from_adapter, explicit) == 0
    with attnpack.apply(pipe, attnpack.FreeNoiseAttention(context_length=16)):
        assert max_diff(run_tiny(pipe, NAME, **kwargs), explicit) > 0  # so the window length mattered


def test_apply_and_remove_without_a_mid_block_motion_module():
    from diffusers import AnimateDiffPipeline, MotionAdapter

    from attnpack.pipelines import tiny

    base = tiny_pipeline(NAME)
    adapter = MotionAdapter(
        block_out_channels=(8, 16),
        motion_layers_per_block=1,
        motion_norm_num_groups=2,
        motion_num_attention_heads=2,
        motion_max_seq_length=32,
        use_motion_mid_block=False,
    )
    unet = tiny._sd_unet(("CrossAttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "CrossAttnUpBlock2D"))
    pipe = AnimateDiffPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet,
        motion_adapter=adapter, scheduler=base.scheduler,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    for component in (pipe.unet, pipe.vae, pipe.text_encoder):
        component.eval()
    stock = run_tiny(pipe, NAME)
    handle = attnpack.apply(pipe, attnpack.FreeNoiseAttention(context_length=2, context_stride=1))
    assert max_diff(run_tiny(pipe, NAME), stock) > 0
    handle.remove()
    assert max_diff(run_tiny(pipe, NAME), stock) == 0
    assert not any(isinstance(m, DeferredPositions) for m in pipe.unet.modules())


def test_long_video_with_a_list_of_generators():
    pipe = tiny_pipeline(NAME)
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    out = long_video(pipe, "a fox", num_frames=40, generator=generators, output_type="pt", **call_kwargs())
    assert out.frames.shape[:2] == (2, 40) and torch.isfinite(out.frames).all()
    assert max_diff(out.frames[0], out.frames[1]) > 0


# ---- FreeNoise and FreeLong on the tiny pipeline


@pytest.mark.parametrize(
    "method",
    [
        attnpack.FreeNoiseAttention(context_length=16),
        attnpack.FreeLongAttention(local_window=16, skip_highest_resolution=False),
    ],
    ids=["freenoise", "freelong"],
)
def test_windows_covering_the_video_reproduce_stock(method):
    pipe = tiny_pipeline(NAME)
    stock = run_tiny(pipe, NAME)
    with attnpack.apply(pipe, method):
        out = run_tiny(pipe, NAME)
    assert max_diff(out, stock) < 1e-5  # positions added after the projection: rounding only
    assert max_diff(run_tiny(pipe, NAME), stock) == 0  # and all back after remove
    assert not any(hasattr(m, POSITIONS_ATTR) for m in pipe.unet.modules())


@pytest.mark.parametrize(
    "method",
    [attnpack.FreeNoiseAttention(), attnpack.FreeLongAttention(), attnpack.FreeLongAttention(local_window=8)],
    ids=["freenoise", "freelong", "freelong-8"],
)
@pytest.mark.parametrize("num_frames", [40, 64])  # 2.5x and 4x the 16-frame window, past the 32 positions
def test_long_videos_run(method, num_frames):
    pipe = tiny_pipeline(NAME)
    with pytest.raises(RuntimeError):  # stock AnimateDiff cannot: its position table has 32 rows
        run_tiny(pipe, NAME, num_frames=num_frames, num_inference_steps=1)
    out = long_video(
        pipe,
        {0: "a red fox", num_frames // 2: "a blue fox"},
        num_frames=num_frames,
        method=method,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **call_kwargs(num_inference_steps=1),
    )
    assert out.frames.shape[1] == num_frames and torch.isfinite(out.frames).all()


def test_bad_settings_name_themselves():
    with pytest.raises(ValueError, match="context_stride=0"):
        attnpack.FreeNoiseAttention(context_stride=0)
    with pytest.raises(ValueError, match="weighting='linear'"):
        attnpack.FreeNoiseAttention(weighting="linear")
    with pytest.raises(ValueError, match="spatial_cutoff=0"):
        attnpack.FreeLongAttention(spatial_cutoff=0)
    with pytest.raises(ValueError, match=r"frame 40 must be an integer in \[0, 40\)"):
        keyframe_prompts({0: "a", 40: "b"}, 40)
    with pytest.raises(ValueError, match="frame 0 needs a prompt"):
        keyframe_prompts({5: "a"}, 40)
    with pytest.raises(ValueError, match="noise='loop'"):
        long_video(tiny_pipeline(NAME), "a fox", num_frames=20, noise="loop")


# ---- FreeLong's pieces against plain torch


def test_gaussian_low_pass_formula():
    mask = gaussian_low_pass((8, 6, 4), spatial_cutoff=0.25, temporal_cutoff=0.5)
    assert mask[4, 3, 2] == 1  # the zero frequency, centred
    t, h, w = (1 - 4) / 4, (5 - 3) / 3, (0 - 2) / 2
    expected = math.exp(-0.5 * ((t / 0.5) ** 2 + (h / 0.25) ** 2 + (w / 0.25) ** 2))
    assert mask[1, 5, 0].item() == pytest.approx(expected, rel=1e-6)


def test_spectral_blend_matches_a_plain_fft():
    torch.manual_seed(1)
    g, l = torch.randn(2, 5, 6, 7, 3), torch.randn(2, 5, 6, 7, 3)  # noqa: E741
    mask = gaussian_low_pass((7, 5, 6), 0.3, 0.4)  # (T, H, W) for dims (3, 1, 2)
    out = spectral_blend([g, l], [mask], dims=(3, 1, 2))
    # the same without shifts: move the mask to unshifted frequencies instead
    unshifted = torch.fft.ifftshift(mask, dim=(0, 1, 2)).permute(1, 2, 0)[None, :, :, :, None].double()
    G, L = torch.fft.fftn(g.double(), dim=(1, 2, 3)), torch.fft.fftn(l.double(), dim=(1, 2, 3))
    expected = torch.fft.ifftn(G * unshifted + L * (1 - unshifted), dim=(1, 2, 3)).real
    assert max_diff(out, expected) < 1e-5
    wide = gaussian_low_pass((7, 5, 6), 1e6, 1e6)
    assert max_diff(spectral_blend([g, l], [wide], dims=(3, 1, 2)), g) < 1e-5  # all low: global


def test_multi_band_blend_splits_the_spectrum():
    torch.manual_seed(4)
    x = torch.randn(1, 6, 4, 5, 2)
    masks = [gaussian_low_pass((6, 4, 5), 0.3, c) for c in (0.1, 0.2, 0.4)]
    assert max_diff(spectral_blend([x, x, x, x], masks, dims=(1, 2, 3)), x) < 1e-5  # the bands sum to one
    branches = [torch.randn_like(x) for _ in range(3)]
    two = spectral_blend(branches[:2], masks[:1], dims=(1, 2, 3))
    # a third branch equal to the second changes nothing: its band was the second's
    assert max_diff(spectral_blend([*branches[:2], branches[1]], masks[:2], dims=(1, 2, 3)), two) < 1e-5


def test_local_window_attention_matches_a_loop():
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 9, 2, 8) for _ in range(3))
    offsets = tuple(torch.randn(4, 2, 8) for _ in range(3))
    out = local_window_attention(q, k, v, 4, offsets=offsets)
    for i in range(9):
        start = min(max(i - 2, 0), 9 - 4)  # the window around frame i, shifted inside at the ends
        qi = q[:, i : i + 1] + offsets[0][i - start]
        ki, vi = k[:, start : start + 4] + offsets[1], v[:, start : start + 4] + offsets[2]
        assert max_diff(out[:, i : i + 1], naive_attention(qi, ki, vi)) < 1e-5


def test_motion_injection_reads_the_last_prompt_in_the_encoder_outside_the_middle_steps():
    from attnpack.api import STATE_ATTR

    pipe = tiny_pipeline(NAME)
    keyframes, _ = pipe.encode_prompt(["a red fox", "a blue fox"], "cpu", 1, False)
    seen = []  # (step, where, conditional rows equal the last prompt on every frame)

    def record(where):
        def hook(module, args, kwargs, output):
            text = kwargs["encoder_hidden_states"]
            step = attnpack.attach(pipe).step_index
            injected = torch.equal(
                text[text.shape[0] // 2 :], keyframes[1:].expand(text.shape[0] // 2, -1, -1)
            )
            seen.append((step, where, injected))

        return hook

    hooks = [
        pipe.unet.get_submodule(name).register_forward_hook(record(name.split(".")[0]), with_kwargs=True)
        for name in (
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2",
            "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
        )
    ]
    long_video(
        pipe,
        {0: "a red fox", 10: "a blue fox"},
        num_frames=20,
        motion_injection=True,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **call_kwargs(num_inference_steps=10),
    )
    for hook in hooks:
        hook.remove()
    down = {step: injected for step, where, injected in seen if where == "down_blocks"}
    up = {step: injected for step, where, injected in seen if where == "up_blocks"}
    assert down == {0: True, 1: False, 2: False, 3: False, **{s: True for s in range(4, 10)}}  # 5 / 15 of 50
    assert not any(up.values())  # the decoder keeps the per-frame prompts
    assert getattr(pipe, STATE_ATTR, None) is None  # long_video attached for the call only


# ---- video DiTs (Wan)

WAN = "tiny-wan-t2v"  # latent frames = (num_frames - 1) / 4 + 1; its grid is F x 2 x 3


def test_frame_band_pattern():
    from attnpack.patterns import frame_band

    pattern = frame_band((6, 3, 4), 1, blocks=(16, 16))
    frames = torch.arange(6).repeat_interleave(12)
    assert torch.equal(pattern.to_dense()[0], (frames[:, None] - frames[None, :]).abs() <= 1)
    with pytest.raises(ValueError, match="radius=-1"):
        frame_band((6, 3, 4), -1)


def test_frame_windows_on_token_slices_match_a_loop():
    torch.manual_seed(5)
    q, k, v = (torch.randn(2, 7 * 6, 2, 8) for _ in range(3))
    windows = frame_windows(7, 3, 2)
    weights = window_weights(3, "pyramid")
    out = windowed_attention(q, k, v, windows, weights, tokens_per_frame=6)
    fused, total = torch.zeros(2, 42, 2, 8, dtype=torch.float64), torch.zeros(42, dtype=torch.float64)
    for start, end in windows:
        part = slice(start * 6, end * 6)
        w = weights.double().repeat_interleave(6)
        fused[:, part] += naive_attention(q[:, part], k[:, part], v[:, part]) * w[None, :, None, None]
        total[part] += w
    assert max_diff(out, fused / total[None, :, None, None]) < 1e-5


@pytest.mark.parametrize(
    "method",
    [attnpack.FreeNoiseAttention(context_length=3), attnpack.FreeLongAttention(local_window=3)],
    ids=["freenoise", "freelong"],
)
def test_wan_windows_covering_the_video_reproduce_stock(method):
    pipe = tiny_pipeline(WAN)
    stock = run_tiny(pipe, WAN)  # 3 latent frames
    with attnpack.apply(pipe, method):
        assert max_diff(run_tiny(pipe, WAN), stock) < 1e-5


@pytest.mark.parametrize(
    "method",
    [
        attnpack.FreeNoiseAttention(context_length=3, context_stride=2),
        attnpack.FreeLongAttention(local_window=3),
        attnpack.FreeLongAttention(local_window=3, band_windows=(6,)),
    ],
    ids=["freenoise", "freelong", "freelong-bands"],
)
def test_wan_at_three_times_the_length(method):
    """9 latent frames for a stand-in trained length of 3: the windows run and change the output."""
    pipe = tiny_pipeline(WAN)
    stock = run_tiny(pipe, WAN, num_frames=33, num_inference_steps=1)
    with attnpack.apply(pipe, method):
        out = run_tiny(pipe, WAN, num_frames=33, num_inference_steps=1)
    assert out.shape == stock.shape and torch.isfinite(out).all() and max_diff(out, stock) > 1e-4


@pytest.mark.parametrize(
    "method",
    [
        attnpack.FreeNoiseAttention(context_length=3, context_stride=2),
        attnpack.FreeLongAttention(local_window=3),
    ],
)
def test_wan_long_video(method):
    from attnpack.api import STATE_ATTR

    pipe = tiny_pipeline(WAN)
    kwargs = tiny_call_kwargs(WAN) | {"num_inference_steps": 1, "output_type": "pt"}
    kwargs.pop("num_frames", None)
    out = long_video(
        pipe, "a fox", num_frames=33, method=method, generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert out.frames.shape[1] == 33 and torch.isfinite(out.frames).all()
    assert getattr(pipe, STATE_ATTR, None) is None
    with pytest.raises(ValueError, match="no motion_injection"):
        long_video(pipe, "a fox", num_frames=33, motion_injection=True, **kwargs)


def test_wan_prompts_per_frame():
    pipe = tiny_pipeline(WAN)
    kwargs = tiny_call_kwargs(WAN) | {"num_inference_steps": 2, "output_type": "pt"}
    kwargs.pop("num_frames", None)
    method = attnpack.FreeNoiseAttention(context_length=3, context_stride=2)

    def video(prompt):
        seed = torch.Generator().manual_seed(0)
        return long_video(pipe, prompt, num_frames=33, method=method, generator=seed, **kwargs).frames

    single = video("a red fox")
    # the same prompt at every keyframe: the per-frame cross-attention path gives the single-prompt video
    assert max_diff(video({0: "a red fox", 16: "a red fox", 32: "a red fox"}), single) < 1e-5
    changing = video({0: "a red fox", 32: "a blue whale"})
    assert torch.isfinite(changing).all() and max_diff(changing, single) > 1e-4
    assert not any(module._forward_pre_hooks for module in pipe.transformer.modules())  # hooks gone


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_windowed_kernel_at_animatediff_size(dtype):
    """The 32 x 32 motion-module level of AnimateDiff 512², 64 frames: 2 x 1024 sequences, 8 heads of 80."""
    q, k, v = (torch.randn(2048, 64, 8, 80, device="cuda", dtype=dtype) for _ in range(3))
    offsets = tuple(torch.randn(16, 8, 80, device="cuda", dtype=dtype) for _ in range(3))
    windows, weights = frame_windows(64, 16, 4), window_weights(16, "pyramid")
    out = windowed_attention(q, k, v, windows, weights, offsets=offsets)
    expected = windowed_attention(q, k, v, windows, weights, offsets=offsets, backend="reference")
    assert max_diff(out, expected) < {torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("with_offsets", [False, True])
def test_gpu_global_local_kernel_at_animatediff_size(with_offsets):
    q, k, v = (torch.randn(2048, 64, 8, 80, device="cuda", dtype=torch.float16) for _ in range(3))
    offsets = {}
    if with_offsets:
        offsets = {
            "global_offsets": tuple(torch.randn(64, 8, 80, device="cuda") for _ in range(3)),
            "local_offsets": tuple(torch.randn(16, 8, 80, device="cuda") for _ in range(3)),
        }
    out = global_local_attention(q, k, v, 16, **offsets)
    expected = global_local_attention(q, k, v, 16, backend="reference", **offsets)
    assert max_diff(out[0], expected[0]) < 5e-3 and max_diff(out[1], expected[1]) < 5e-3
