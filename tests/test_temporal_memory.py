"""FreeLong's blend and FreeNoise's windows in bounded memory (issue 21): the chunked blend against the plain
full-size FFT formula, the chunked references against their unchunked selves, and the peak memory of whole
calls against the bytes of the dense attention's q, k, v and out."""

import types
import weakref

import pytest
import torch
from helpers import max_diff
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import attnpack.kernels.temporal_windows.reference as reference
import attnpack.methods.freelong as freelong
from attnpack.kernels import global_local_attention, local_window_attention, windowed_attention
from attnpack.layout import Role
from attnpack.methods.freelong import FreeLongAttention, gaussian_low_pass, spectral_blend
from attnpack.methods.freenoise import FreeNoiseAttention, window_weights
from attnpack.methods.temporal import POSITIONS_ATTR, frame_windows


def plain_blend(outputs, low_passes, dims):
    """The blend as first written: full-size shifted complex spectra in float64, one per branch."""
    shape = [1] * outputs[0].ndim
    for d, n in zip(dims, low_passes[0].shape, strict=True):
        shape[d] = n
    order = sorted(range(3), key=lambda i: dims[i])
    masks = [m.double().permute(order).reshape(shape) for m in low_passes]
    up_to, below = [*masks, torch.ones(())], [torch.zeros(()), *masks]
    mixed = sum(
        torch.fft.fftshift(torch.fft.fftn(x.double(), dim=dims), dim=dims) * (hi - lo)
        for x, hi, lo in zip(outputs, up_to, below, strict=True)
    )
    return torch.fft.ifftn(torch.fft.ifftshift(mixed, dim=dims), dim=dims).real


# ---- the chunked blend against the plain formula

FFT = 7 * 5 * 6  # values of one FFT over (T, H, W) = (7, 5, 6)


@pytest.mark.parametrize("chunk_size", [1, FFT, 2 * FFT, 5 * FFT + 3, 7 * FFT, None, 10**9])
@pytest.mark.parametrize("bands", [1, 3])
def test_chunked_blend_matches_the_plain_formula(chunk_size, bands):
    torch.manual_seed(0)
    # (B, H, W, F, heads, D) as FreeLong's AnimateDiff path blends it: FFT over dims (3, 1, 2)
    outputs = [torch.randn(2, 5, 6, 7, 3, 4) for _ in range(bands + 1)]
    masks = [gaussian_low_pass((7, 5, 6), 0.3, c) for c in (0.15, 0.3, 0.6)[:bands]]
    expected = plain_blend(outputs, masks, (3, 1, 2))
    out = spectral_blend(outputs, masks, dims=(3, 1, 2), chunk_size=chunk_size)
    assert out.dtype == torch.float32 and out.shape == outputs[0].shape
    assert max_diff(out, expected) < 1e-5
    # in place into the first branch, as FreeLongAttention calls it
    first = outputs[0].clone()
    blended = spectral_blend([first, *outputs[1:]], masks, dims=(3, 1, 2), out=first, chunk_size=chunk_size)
    assert blended is first and max_diff(first, expected) < 1e-5


@pytest.mark.parametrize("chunk_size", [1, 3 * 4 * 5 * 6 + 1, None])
def test_chunked_blend_on_strided_and_half_precision_branches(chunk_size):
    torch.manual_seed(1)
    # Wan's video tokens straight from SDPA: (B, H, S, D) storage seen as (B, F, H, W, heads, D)
    grid, heads, dim = (3, 4, 5), 2, 6
    outputs = [
        torch.randn(2, heads, 60, dim).transpose(1, 2).unflatten(1, grid).to(torch.bfloat16) for _ in range(2)
    ]
    mask = gaussian_low_pass(grid, 0.4, 0.3)
    out = spectral_blend(outputs, [mask], dims=(1, 2, 3), chunk_size=chunk_size)
    assert out.dtype == torch.bfloat16
    expected = plain_blend(outputs, [mask], (1, 2, 3))
    assert max_diff(out, expected) <= 2**-7 * expected.abs().max().item()  # bf16 rounding of the result


def test_blend_of_any_real_filter_keeps_the_real_part_of_the_plain_formula():
    torch.manual_seed(2)
    outputs = [torch.randn(6, 4, 5, 3) for _ in range(2)]
    mask = torch.rand(6, 4, 5)  # not symmetric: the real FFTs see its even part, as .real did
    assert (
        max_diff(
            spectral_blend(outputs, [mask], dims=(0, 1, 2), chunk_size=50),
            plain_blend(outputs, [mask], (0, 1, 2)),
        )
        < 1e-5
    )


def test_blend_rejects_mismatched_shapes_and_chunk_sizes():
    x = torch.zeros(2, 4, 4, 4, 3)
    mask = gaussian_low_pass((4, 4, 4), 0.25, 0.25)
    with pytest.raises(ValueError, match="one shape"):
        spectral_blend([x, x[:1]], [mask], dims=(1, 2, 3))
    with pytest.raises(ValueError, match="chunk_size=0"):
        spectral_blend([x, x], [mask], dims=(1, 2, 3), chunk_size=0)


def test_the_low_pass_filter_is_computed_once_per_grid():
    method = FreeLongAttention(local_window=4, band_windows=(8,))
    first = method.low_passes((16, 6, 5), method.windows(16))
    again = method.low_passes((16, 6, 5), method.windows(16))
    assert all(a is b for a, b in zip(first, again, strict=True))
    # variant="official" (the default): the public filter, off centre at the odd width
    assert torch.equal(first[1], gaussian_low_pass((16, 6, 5), 0.25, 0.25, centred=False))
    kept = FreeLongAttention(local_window=4, band_windows=(8,), variant="attnpack")
    assert torch.equal(kept.low_passes((16, 6, 5), [4])[0], gaussian_low_pass((16, 6, 5), 0.25, 0.25))


# ---- chunked references against one chunk


def test_chunks_of_sequences_change_nothing(monkeypatch):
    torch.manual_seed(3)
    q, k, v = (torch.randn(37, 20, 2, 8) for _ in range(3))
    global_offsets = tuple(torch.randn(20, 2, 8) for _ in range(3))
    local_offsets = tuple(torch.randn(6, 2, 8) for _ in range(3))
    kwargs = {"global_offsets": global_offsets, "local_offsets": local_offsets}
    whole = global_local_attention(q, k, v, 6, backend="reference", **kwargs)
    whole_local = local_window_attention(q, k, v, 6, offsets=local_offsets)
    per_row = reference.CHUNK_BYTES // reference._rows_per_chunk(q, 6)
    monkeypatch.setattr(reference, "CHUNK_BYTES", 5 * per_row)  # chunks of 5 sequences: 37 = 7 x 5 + 2
    assert reference._rows_per_chunk(q, 6) == 5
    chunked = global_local_attention(q, k, v, 6, backend="reference", **kwargs)
    assert max_diff(chunked[0], whole[0]) < 1e-6 and max_diff(chunked[1], whole[1]) < 1e-6
    assert max_diff(local_window_attention(q, k, v, 6, offsets=local_offsets), whole_local) < 1e-6


@pytest.mark.parametrize("tokens_per_frame", [1, 3])
def test_windows_accumulated_in_place_match_the_stacked_formula(tokens_per_frame):
    torch.manual_seed(4)
    frames, length = 25, 8
    windows = frame_windows(frames, length, 3)  # the last window ends at the last frame, off the stride
    q, k, v = (torch.randn(3, frames * tokens_per_frame, 2, 8) for _ in range(3))
    offsets = tuple(torch.randn(length, 2, 8) for _ in range(3)) if tokens_per_frame == 1 else None
    weights = window_weights(length, "pyramid")
    out = windowed_attention(q, k, v, windows, weights, offsets=offsets, tokens_per_frame=tokens_per_frame)
    fused, total = torch.zeros(q.shape, dtype=torch.float64), torch.zeros(frames, dtype=torch.float64)
    for start, end in windows:
        part = slice(start * tokens_per_frame, end * tokens_per_frame)
        qw, kw, vw = (x[:, part].double() for x in (q, k, v))
        if offsets is not None:
            qw, kw, vw = (x + o.double() for x, o in zip((qw, kw, vw), offsets, strict=True))
        scores = torch.einsum("bqhd,bkhd->bhqk", qw, kw) * 8**-0.5
        attended = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), vw)
        fused[:, part] += attended * weights.double().repeat_interleave(tokens_per_frame)[None, :, None, None]
        total[start:end] += weights.double()
    assert max_diff(out, fused / total.repeat_interleave(tokens_per_frame)[None, :, None, None]) < 1e-5


# ---- peak memory of whole calls


class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensors the block allocates and holds at once, counted at the dispatcher: every op's
    new storage is added and subtracted when its last tensor dies. Exact and the same on every run, where the
    process' RSS read 0.17x to 0.52x a branch for one blend, by what the allocator and the other tests' threads
    had kept (CI failed at 0.43x)."""

    def __init__(self):
        super().__init__()
        self.live = self.growth = 0
        self.storages = {}  # data_ptr -> (bytes, {id(weakref): weakref} of the tensors on it)

    def _tensor_died(self, ptr, ref):
        nbytes, refs = self.storages.get(ptr, (0, {}))
        refs.pop(id(ref), None)
        if not refs and ptr in self.storages:
            self.live -= nbytes
            del self.storages[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if torch.is_tensor(t)
        }
        for tensor in tree_flatten(out)[0]:
            if not torch.is_tensor(tensor):
                continue
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self.storages:
                if ptr in given:  # in place, a view or out= into memory that was there before the block
                    continue
                self.storages[ptr] = (storage.nbytes(), {})
                self.live += storage.nbytes()
                self.growth = max(self.growth, self.live)
            ref = weakref.ref(tensor, lambda r, p=ptr: self._tensor_died(p, r))
            self.storages[ptr][1][id(ref)] = ref
        return out


# one motion-module level at a moderate size: 2 x 32 x 32 pixels, 32 frames, 4 heads of 32 (float32)
SEQUENCES, FRAMES, HEADS, DIM, HW = 2 * 32 * 32, 32, 4, 32, (32, 32)


def temporal_call(seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(SEQUENCES, FRAMES, HEADS, DIM, generator=g) for _ in range(3))
    module = torch.nn.Module()
    channels = HEADS * DIM
    module.to_q, module.to_k, module.to_v = (
        torch.nn.Linear(channels, channels, bias=False) for _ in range(3)
    )
    module.heads, module.norm_q, module.norm_k = HEADS, None, None
    setattr(
        module, POSITIONS_ATTR, torch.randn(1, 16, channels, generator=g)
    )  # a table shorter than the video
    call = types.SimpleNamespace(
        query=q, key=k, value=v, module=module, attn_mask=None, scale=None,
        layout=types.SimpleNamespace(role=Role.TEMPORAL, batch_grid=HW, grid=None),
        site=types.SimpleNamespace(name="probe"), context=types.SimpleNamespace(grid=(FRAMES, 64, 64)),
    )  # fmt: skip
    return call, 4 * q.numel() * q.element_size()  # q, k, v and out of the dense attention


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks as small against this geometry as the defaults are against the real ones (16 MiB of a 671 MB
    branch at AnimateDiff 512², 64 frames)."""
    monkeypatch.setattr(freelong, "CHUNK_SIZE", 1 << 18)
    monkeypatch.setattr(reference, "CHUNK_BYTES", 1 << 23)


@pytest.mark.parametrize(
    "method",
    [
        FreeLongAttention(local_window=8, skip_highest_resolution=False),
        FreeNoiseAttention(context_length=8, context_stride=2),
    ],
    ids=["freelong", "freenoise"],
)
def test_temporal_methods_stay_within_the_dense_attentions_memory(method, small_chunks):
    call, dense_bytes = temporal_call()
    with torch.no_grad():
        method.attend(call)  # warm up: one-time allocations of the libraries are not the method's
        with PeakTensorBytes() as peak:
            out = method.attend(call)
    assert out.shape == call.query.shape
    # the issue's bound is 1.5x; the blend's or the windows' full-size copies reached 3.7x to 4.3x (RSS); now 0.53x, 0.56x
    assert peak.growth < 0.9 * dense_bytes, f"{type(method).__name__}: {peak.growth / dense_bytes:.2f}x"


def test_the_blend_in_place_needs_a_few_chunks(small_chunks):
    g = torch.Generator().manual_seed(1)
    shape = (2, *HW, FRAMES, HEADS, DIM)
    branches = [torch.randn(shape, generator=g) for _ in range(2)]
    mask = gaussian_low_pass((FRAMES, *HW), 0.25, 0.25)
    spectral_blend(branches, [mask], dims=(3, 1, 2), out=branches[0])  # warm up
    with PeakTensorBytes() as peak:
        spectral_blend(branches, [mask], dims=(3, 1, 2), out=branches[0])
    branch_bytes = branches[0].numel() * 4
    # full-size complex spectra take 14x a branch (plain_blend, same meter); the chunks 0.13x
    assert peak.growth < 0.3 * branch_bytes, f"{peak.growth / branch_bytes:.2f}x a branch"
