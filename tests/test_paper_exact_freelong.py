"""FreeLong variant="official" against a literal re-implementation of the public code (aniki-ly/FreeLong,
LaVie / VideoCrafter2 `get_adjusted_local_mask`, `gaussian_low_pass_filter`, `freq_mix_3d`, `combine()`):
masks equal, filters equal, blends and whole pipelines within 1e-5; variant="attnpack" kept and different."""

import pytest
import torch
import torch.nn.functional as F
from helpers import max_diff, run_tiny, tiny_pipeline

import attnpack
from attnpack.methods.freelong import gaussian_low_pass, spectral_blend
from attnpack.patterns.frame_band import frame_window, frame_window_mask

# ---- the public code, re-implemented literally (loops and all)


def public_adjusted_local_mask(seq_length: int, window_size: int) -> torch.Tensor:
    """get_adjusted_local_mask, as a bool mask (True: may attend)."""
    mask = torch.zeros(seq_length, seq_length, dtype=torch.bool)
    for i in range(seq_length):
        start = max(0, i - window_size // 2)
        end = min(seq_length, i + window_size // 2 + 1)
        if (end - start) < window_size:
            if start == 0:
                end = min(seq_length, start + window_size)
            else:
                start = max(0, end - window_size)
        mask[i, start:end] = True
    return mask


def public_gaussian_low_pass_filter(shape, d_s=0.25, d_t=0.25) -> torch.Tensor:
    T, H, W = shape
    t = torch.arange(T).float() * 2 / T - 1
    h = torch.arange(H).float() * 2 / H - 1
    w = torch.arange(W).float() * 2 / W - 1
    grid_t, grid_h, grid_w = torch.meshgrid(t, h, w, indexing="ij")
    d_square = (grid_t * (1 / d_t)).pow(2) + (grid_h * (1 / d_s)).pow(2) + (grid_w * (1 / d_s)).pow(2)
    return torch.exp(-0.5 * d_square)


def public_freq_mix_3d(x, noise, LPF):
    dims = (-3, -2, -1)
    x_freq = torch.fft.fftshift(torch.fft.fftn(x, dim=dims), dim=dims)
    noise_freq = torch.fft.fftshift(torch.fft.fftn(noise, dim=dims), dim=dims)
    mixed = x_freq * LPF + noise_freq * (1 - LPF)
    return torch.fft.ifftn(torch.fft.ifftshift(mixed, dim=dims), dim=dims).real


def public_combine(global_feat, local_feat, frames, h, w, d_s, d_t, highest):
    """combine(): (b h w) f c features blended over (f, h, w); the highest resolution takes local."""
    if highest:
        return local_feat
    to_grid = lambda x: x.unflatten(0, (-1, h, w)).permute(0, 4, 3, 1, 2)  # noqa: E731  b c f h w
    lpf = public_gaussian_low_pass_filter([frames, h, w], d_s=d_s, d_t=d_t)
    mixed = public_freq_mix_3d(to_grid(global_feat).float(), to_grid(local_feat).float(), LPF=lpf)
    return mixed.permute(0, 3, 4, 2, 1).flatten(0, 2).to(global_feat.dtype)


# ---- pieces


@pytest.mark.parametrize("frames, window", [(64, 16), (20, 16), (17, 16), (33, 8), (17, 5), (9, 5), (7, 4)])
def test_local_mask_is_the_public_one(frames, window):
    assert torch.equal(frame_window_mask(frames, window), public_adjusted_local_mask(frames, window))


def test_the_public_mask_gives_middle_frames_one_more_frame_for_even_windows():
    sizes = frame_window_mask(64, 16).sum(1)
    assert (sizes == 17).sum() == 48 and (sizes == 16).sum() == 16  # what attnpack's windows differ in
    assert (frame_window_mask(17, 5).sum(1) == 5).all()  # odd windows: exactly the window everywhere


@pytest.mark.parametrize("grid, window", [((9, 2, 3), 5), ((12, 4, 4), 4), ((20, 1, 5), 16), ((5, 3, 3), 2)])
def test_frame_window_pattern_is_the_mask_over_tokens(grid, window):
    per_frame = grid[1] * grid[2]
    expected = public_adjusted_local_mask(grid[0], window)
    expected = expected.repeat_interleave(per_frame, 0).repeat_interleave(per_frame, 1)
    for blocks in ((16, 16), (32, 16)):
        assert torch.equal(frame_window(grid, window, blocks=blocks).to_dense()[0], expected)


@pytest.mark.parametrize("shape", [(128, 5, 8), (61, 30, 52), (9, 5, 8), (16, 10, 16)])
def test_low_pass_is_the_public_one(shape):
    public = public_gaussian_low_pass_filter(shape, 0.25, 0.25)
    assert max_diff(gaussian_low_pass(shape, 0.25, 0.25, centred=False), public) < 1e-6
    centred = gaussian_low_pass(shape, 0.25, 0.25)
    if all(n % 2 == 0 for n in shape):
        assert max_diff(centred, public) < 1e-6
    else:  # odd sizes: the public filter's peak sits 1/n below the zero frequency
        assert max_diff(centred, public) > 1e-2


def test_blend_is_the_public_freq_mix():
    torch.manual_seed(0)
    g, l = torch.randn(2, 3, 9, 5, 8), torch.randn(2, 3, 9, 5, 8)  # noqa: E741  b c f h w, odd f and h
    lpf = public_gaussian_low_pass_filter([9, 5, 8])
    ours = spectral_blend([g, l], [gaussian_low_pass((9, 5, 8), 0.25, 0.25, centred=False)], dims=(2, 3, 4))
    assert max_diff(ours, public_freq_mix_3d(g, l, lpf)) < 1e-5


# ---- whole pipelines against processors written from the public code


class PublicTemporalProcessor:
    """LaVie's freelong_temp_attn on a diffusers motion module: one attention (the block adds the frame
    positions before it) unmasked and under the adjusted local mask, combined."""

    def __init__(self, window, levels, skip_highest=True, d_s=0.25, d_t=0.25):
        self.window, self.levels, self.skip_highest, self.d_s, self.d_t = (
            window,
            levels,
            skip_highest,
            d_s,
            d_t,
        )

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **_):
        x = hidden_states  # (b h w, f, c)
        frames = x.shape[1]
        q, k, v = (
            p(x).unflatten(-1, (attn.heads, -1)).transpose(1, 2) for p in (attn.to_q, attn.to_k, attn.to_v)
        )
        mask = public_adjusted_local_mask(frames, self.window)
        out = lambda o: attn.to_out[0](o.transpose(1, 2).flatten(2))  # noqa: E731
        global_feat = out(F.scaled_dot_product_attention(q, k, v))
        local_feat = out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        h, w, highest = self.levels[attn]
        return public_combine(
            global_feat, local_feat, frames, h, w, self.d_s, self.d_t, highest and self.skip_highest
        )


def _watch_levels(unet, levels):
    """Record each motion module's (h, w, highest) from its input, for the public processor."""
    latent = {}
    hooks = [unet.register_forward_pre_hook(lambda m, args: latent.update(hw=args[0].shape[-2:]))]
    for module in unet.modules():
        if type(module).__name__ == "AnimateDiffTransformer3D":
            attns = [m for m in module.modules() if hasattr(m, "to_q")]

            def hook(m, args, attns=attns):
                h, w = args[0].shape[-2:]
                for a in attns:
                    levels[a] = (h, w, (h, w) == tuple(latent["hw"]))

            hooks.append(module.register_forward_pre_hook(hook))
    return hooks


ANIMATEDIFF = "tiny-animatediff"


@pytest.mark.parametrize("window, frames", [(4, 12), (3, 10)])
@pytest.mark.parametrize("skip", [True, False])
def test_official_freelong_on_animatediff_is_the_public_code(window, frames, skip):
    pipe = tiny_pipeline(ANIMATEDIFF)
    levels = {}
    hooks = _watch_levels(pipe.unet, levels)
    original = dict(pipe.unet.attn_processors)
    public = PublicTemporalProcessor(window, levels, skip_highest=skip)  # skip=False: blend at every level
    pipe.unet.set_attn_processor({n: (public if "motion_modules" in n else p) for n, p in original.items()})
    theirs = run_tiny(pipe, ANIMATEDIFF, num_frames=frames)
    pipe.unet.set_attn_processor(original)
    for hook in hooks:
        hook.remove()
    method = attnpack.FreeLongAttention(local_window=window, skip_highest_resolution=skip)
    assert method.variant == "official"
    with attnpack.apply(pipe, method):
        ours = run_tiny(pipe, ANIMATEDIFF, num_frames=frames)
    with attnpack.apply(
        pipe,
        attnpack.FreeLongAttention(local_window=window, skip_highest_resolution=skip, variant="attnpack"),
    ):
        kept = run_tiny(pipe, ANIMATEDIFF, num_frames=frames)
    assert max_diff(ours, theirs) < 1e-5
    assert max_diff(kept, theirs) > 1e-4  # attnpack's windows, positions and filter are another method


WAN = "tiny-wan-t2v"


class PublicWanProcessor:
    """The public combine() on Wan's video self-attention: the stock processor unmasked and under the
    adjusted local mask over frames, blended over the (F, H, W) token grid."""

    def __init__(self, stock, window, grid):
        self.stock, self.window, self.grid = stock, window, grid

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None:  # cross-attention: stock
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        frames, h, w = self.grid
        mask = (
            public_adjusted_local_mask(frames, self.window)
            .repeat_interleave(h * w, 0)
            .repeat_interleave(h * w, 1)
        )
        global_feat = self.stock(attn, hidden_states, None, None, rotary_emb)
        local_feat = self.stock(attn, hidden_states, None, mask, rotary_emb)
        to_grid = lambda x: x.unflatten(1, (frames, h, w)).permute(0, 4, 1, 2, 3)  # noqa: E731  b c f h w
        lpf = public_gaussian_low_pass_filter([frames, h, w])
        mixed = public_freq_mix_3d(to_grid(global_feat).float(), to_grid(local_feat).float(), LPF=lpf)
        return mixed.permute(0, 2, 3, 4, 1).flatten(1, 3).to(global_feat.dtype)


@pytest.mark.parametrize("window", [2, 3])
def test_official_freelong_on_wan_is_the_public_code(window):
    pipe = tiny_pipeline(WAN)
    original = dict(pipe.transformer.attn_processors)
    grid = (9, 2, 3)  # 33 frames; 32 x 48 pixels
    pipe.transformer.set_attn_processor({n: PublicWanProcessor(p, window, grid) for n, p in original.items()})
    theirs = run_tiny(pipe, WAN, num_frames=33, num_inference_steps=1)
    pipe.transformer.set_attn_processor(original)
    with attnpack.apply(pipe, attnpack.FreeLongAttention(local_window=window)):
        ours = run_tiny(pipe, WAN, num_frames=33, num_inference_steps=1)
    with attnpack.apply(pipe, attnpack.FreeLongAttention(local_window=window, variant="attnpack")):
        kept = run_tiny(pipe, WAN, num_frames=33, num_inference_steps=1)
    assert max_diff(ours, theirs) < 1e-5
    assert max_diff(kept, theirs) > 1e-4


def test_variant_is_checked():
    with pytest.raises(ValueError, match="variant='paper'"):
        attnpack.FreeLongAttention(variant="paper")
