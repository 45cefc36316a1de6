"""Quality metrics for images and videos: fidelity to the dense run, text and reference alignment, video
dynamics and consistency, distribution distances between sets (FID, KID, FVD), trajectory adherence,
subject consistency.

Images and frames are uint8 arrays (H, W, 3) or (F, H, W, 3). Metrics that need a model (CLIP, DINO,
LPIPS, Inception, I3D) load it by id through transformers / torchmetrics / torch hub; a model that cannot be
loaded (offline, missing, a package not installed) raises `MetricModelUnavailable` naming it and how to get
it. Every consistency-type score is higher-is-better.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MODEL = "openai/clip-vit-base-patch32"
DINO_MODEL = "facebook/dinov2-small"
VBENCH_DINO_MODEL = "facebook/dino-vitb16"  # VBench's subject consistency: DINO ViT-B/16
PSNR_CAP = 100.0  # dB: reports show identical outputs (infinite PSNR) at this value
I3D_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"  # StyleGAN-V's FVD detector
I3D_FILE = "i3d_torchscript.pt"
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception v3

Box = tuple[float, float, float, float]  # y1, y2, x1, x2 in [0, 1] (the trajectory format)


class MetricModelUnavailable(RuntimeError):
    """A metric's model cannot be loaded; the message names the id and how to get it."""


def _frames(video) -> np.ndarray:
    array = np.asarray(video)
    return array[None] if array.ndim == 3 else array


# ---- fidelity to the dense run


def psnr(a, b, cap: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images or videos (peak 255, MSE over every pixel and
    channel); inf when identical, or `cap` when given (reports use PSNR_CAP, 100 dB)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    _same_shape(a, b)
    mse = float(((a - b) ** 2).mean())
    value = float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))
    return value if cap is None else min(value, cap)


def ssim(a, b) -> float:
    """Structural similarity on R, G and B, equal to torchmetrics' `structural_similarity_index_measure`
    (data_range=255): Gaussian window 11, σ 1.5, K1 0.01, K2 0.03, borders reflected, mean over channels and
    every pixel, then over frames. 1 when identical, higher is closer (<= 1). scikit-image's
    `structural_similarity(channel_axis=-1, gaussian_weights=True, use_sample_covariance=False)` leaves the
    5-pixel border out instead (a few 1e-3 apart on small images)."""
    a, b = _frames(a), _frames(b)
    _same_shape(a, b)
    return float(_ssim_index(_chw(a), _chw(b)).mean())


def ssim_luma(a, b) -> float:
    """SSIM as `ssim` on luminance (0.299 R + 0.587 G + 0.114 B) of each frame, mean over frames; reads higher
    than RGB SSIM where the errors are in colour (JPEG chroma)."""
    a, b = _frames(a), _frames(b)
    _same_shape(a, b)
    luma = lambda v: torch.from_numpy(np.stack([_gray(f) for f in v]))[:, None]  # noqa: E731
    return float(_ssim_index(luma(a), luma(b)).mean())


def _chw(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(frames, np.float64)).permute(0, 3, 1, 2)


def _ssim_index(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per image, the mean SSIM index of (N, C, H, W) tensors in 0-255 (each channel on its own), as
    torchmetrics computes it."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    channels = x.shape[1]
    window = _gaussian_window(11, 1.5).expand(channels, 1, 11, 11)
    mode = "reflect" if min(x.shape[-2:]) > 5 else "replicate"
    pad = lambda t: F.pad(t.double(), (5, 5, 5, 5), mode=mode)  # noqa: E731
    blur = lambda t: F.conv2d(t, window, groups=channels)  # noqa: E731
    x, y = pad(x), pad(y)
    mx, my = blur(x), blur(y)
    sxx, syy = (blur(x * x) - mx**2).clamp(min=0), (blur(y * y) - my**2).clamp(min=0)
    sxy = blur(x * y) - mx * my
    value = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return value.flatten(1).mean(-1)


@functools.lru_cache(maxsize=4)
def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - size // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def lpips(a, b, net: str | Callable = "alex") -> float:
    """LPIPS (Zhang et al. 2018, torchmetrics' `LearnedPerceptualImagePatchSimilarity`), mean over frames;
    0 when identical, lower is closer. `net`: "alex" (the paper's default), "vgg" or "squeeze" (these need
    torchvision and its backbone weights), or a module taking two (N, 3, H, W) batches in [-1, 1] and
    returning N distances."""
    network = _lpips_network(net) if isinstance(net, str) else net
    x, y = (
        torch.from_numpy(np.array(_frames(v), np.float32)).permute(0, 3, 1, 2) / 127.5 - 1 for v in (a, b)
    )
    if x.shape != y.shape:
        raise ValueError(f"the outputs to compare differ in shape: {np.shape(a)} and {np.shape(b)}")
    with torch.no_grad():
        return float(torch.as_tensor(network(x, y)).float().mean())


@functools.lru_cache(maxsize=3)
def _lpips_network(net: str):
    if net not in ("alex", "vgg", "squeeze"):
        raise ValueError(f"LPIPS net {net!r} is not one of 'alex', 'vgg', 'squeeze'")
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        return LearnedPerceptualImagePatchSimilarity(net_type=net).net.eval()
    except Exception as error:
        raise MetricModelUnavailable(
            f"LPIPS ({net!r} weights) cannot be loaded: {_first_line(error)}. It needs `pip install "
            "torchmetrics torchvision` (a torchvision built for this torch) and the backbone weights downloaded "
            "once while online"
        ) from error


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


# ---- distances between sets: FID, KID (images), FVD (videos)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance of two Gaussians, ||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½), in float64 (the trace
    of the root as the sum of the square roots of the eigenvalues of S1 S2, as torchmetrics computes it)."""
    mu1, sigma1, mu2, sigma2 = (
        torch.as_tensor(np.asarray(v), dtype=torch.float64) for v in (mu1, sigma1, mu2, sigma2)
    )
    root_trace = torch.linalg.eigvals(sigma1 @ sigma2).sqrt().real.sum()
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * root_trace)


def gaussian_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, N - 1) of features (N, D); N >= 2."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"features have shape {features.shape}; give (N, D) with N >= 2 samples")
    return features.mean(0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def fid(images: Sequence, reference: Sequence, feature: torch.nn.Module | None = None) -> float:
    """Fréchet Inception Distance (Heusel et al. 2017) of `images` to `reference`, by torchmetrics'
    `FrechetInceptionDistance`: Gaussians fitted to Inception v3 pool features (2048, torch-fidelity's port of
    the TF FID network), Fréchet distance. Each item is an image (H, W, 3) or frames (F, H, W, 3), every frame
    counting as an image; >= 2 images a set. 0 for identical sets, lower is closer; papers use 10k-50k images,
    small sets read higher. `feature`: a module mapping uint8 (N, 3, H, W) to (N, D) in place of Inception."""
    metric = _set_metric("fid", feature)
    _update(metric, images, reference)
    if metric.real_features_num_samples < 2 or metric.fake_features_num_samples < 2:
        raise ValueError("FID needs at least 2 images in each set")
    return float(metric.compute())


def kid(images: Sequence, reference: Sequence, feature: torch.nn.Module | None = None, subsets: int = 100,
        subset_size: int | None = None) -> dict[str, float]:  # fmt: skip
    """Kernel Inception Distance (Bińkowski et al. 2018) by torchmetrics' `KernelInceptionDistance`: the
    unbiased MMD² with a cubic polynomial kernel on Inception features, mean and std over `subsets` random
    subsets of `subset_size` (default min(1000, the smaller set)), seeded. 0 (can dip below) for identical
    sets, lower is closer; papers often print it x 1000. Inputs and `feature` as in `fid`."""
    count = min(_count(images), _count(reference))
    size = subset_size or min(1000, count)
    if count < 2 or size > count:
        raise ValueError(
            f"KID subset_size {size} needs at least that many (and >= 2) images in each set; has {count}"
        )
    metric = _set_metric("kid", feature, subsets=subsets, subset_size=size)
    _update(metric, images, reference)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mean, std = metric.compute()
    return {"mean": float(mean), "std": float(std)}


def _count(items: Sequence) -> int:
    return sum(len(_frames(item)) for item in items)


def _update(metric, images: Sequence, reference: Sequence) -> None:
    with torch.no_grad():
        for items, real in ((reference, True), (images, False)):
            for item in items:
                frames = torch.from_numpy(np.array(_frames(item))).permute(0, 3, 1, 2)
                for chunk in frames.split(32):
                    metric.update(chunk, real=real)


def _set_metric(kind: str, feature, **options):
    try:
        if kind == "fid":
            from torchmetrics.image.fid import FrechetInceptionDistance as Metric
        else:
            from torchmetrics.image.kid import KernelInceptionDistance as Metric
    except ImportError as error:
        raise MetricModelUnavailable(
            f"{kind.upper()} needs torchmetrics: `pip install torchmetrics`"
        ) from error
    if feature is not None:
        return Metric(feature=feature, **options)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    try:
        if _offline() and not cached.exists():
            raise FileNotFoundError(f"offline (HF_HUB_OFFLINE) and {str(cached)!r} is not there")
        return Metric(feature=2048, **options)
    except Exception as error:
        raise MetricModelUnavailable(
            f"{kind.upper()}'s Inception v3 ({INCEPTION_FILE}) cannot be loaded: {_first_line(error)}. It "
            "needs `pip install torch-fidelity` (with a torchvision built for this torch) and the weights downloaded "
            f"once while online (to {cached.parent}), or pass `feature=` a feature module"
        ) from error


def fvd(videos: Sequence, reference: Sequence, feature: Callable | str | None = None) -> float:
    """Fréchet Video Distance (Unterthiner et al. 2018) of `videos` to `reference`: the Fréchet distance of
    Gaussians fitted to I3D (Kinetics-400) features of each whole video, with StyleGAN-V's TorchScript port of
    the TF-Hub I3D (`i3d_model`; 400 logits, frames resized so the short side is 224, centre crop, [-1, 1]) as
    used by StyleGAN-V and common video-metric code. >= 2 videos a set; 0 for identical sets, lower is closer;
    papers use 16-frame clips and 2048 videos. `feature`: an I3D file path, or a callable mapping
    (N, 3, T, 224, 224) in [-1, 1] to (N, D)."""
    if len(videos) < 2 or len(reference) < 2:
        raise ValueError(f"FVD needs at least 2 videos in each set; has {len(videos)} and {len(reference)}")
    return frechet_distance(
        *gaussian_statistics(video_features(videos, feature)),
        *gaussian_statistics(video_features(reference, feature)),
    )


def video_features(videos: Sequence, feature: Callable | str | None = None) -> np.ndarray:
    """I3D features (N, D) of videos (F, H, W, 3), one each (see `fvd`)."""
    network = i3d_model(feature) if feature is None or isinstance(feature, str | Path) else feature
    rows = []
    with torch.no_grad():
        for video in videos:
            frames = _frames(video)
            if len(frames) < 2:
                raise ValueError(f"FVD scores videos; got a single image of shape {np.shape(video)}")
            rows.append(torch.as_tensor(network(_i3d_input(frames))).double().reshape(1, -1))
    return torch.cat(rows).numpy()


def _i3d_input(frames: np.ndarray, side: int = 224) -> torch.Tensor:
    video = torch.from_numpy(np.array(frames, np.float32)).permute(0, 3, 1, 2) / 255  # T, C, H, W
    height, width = video.shape[-2:]
    scale = side / min(height, width)
    size = (max(side, round(height * scale)), max(side, round(width * scale)))
    video = F.interpolate(video, size=size, mode="bilinear", align_corners=False)
    top, left = (size[0] - side) // 2, (size[1] - side) // 2
    video = video[..., top : top + side, left : left + side]
    return ((video - 0.5) * 2).permute(1, 0, 2, 3)[None].contiguous()  # 1, C, T, H, W


class _I3D(torch.nn.Module):
    def __init__(self, detector):
        super().__init__()
        self.detector = detector

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        return self.detector(videos, rescale=False, resize=False, return_features=True)


@functools.lru_cache(maxsize=2)
def i3d_model(path: str | Path | None = None) -> torch.nn.Module:
    """FVD's I3D detector (StyleGAN-V's `i3d_torchscript.pt`) from `path`, or from the torch hub cache, where it
    is downloaded from I3D_URL once unless offline (HF_HUB_OFFLINE)."""
    file = Path(path) if path else Path(torch.hub.get_dir()) / "checkpoints" / I3D_FILE
    try:
        if not file.exists():
            if path or _offline():
                raise FileNotFoundError(
                    f"{str(file)!r} does not exist" + ("" if path else " (offline: HF_HUB_OFFLINE)")
                )
            file.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(I3D_URL, str(file))
        return _I3D(torch.jit.load(str(file), map_location="cpu").eval())
    except Exception as error:
        raise MetricModelUnavailable(
            f"FVD's I3D detector ({I3D_FILE}) cannot be loaded: {_first_line(error)}. Download it while online "
            f"({I3D_URL}) to {file.parent if not path else file} or pass its path"
        ) from error


def _gray(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, np.float64)
    return image @ np.array([0.299, 0.587, 0.114]) if image.ndim == 3 else image


def _same_shape(a, b) -> None:
    if np.shape(a) != np.shape(b):
        raise ValueError(f"the outputs to compare differ in shape: {np.shape(a)} and {np.shape(b)}")


# ---- models: CLIP and DINO


@functools.lru_cache(maxsize=4)
def _load(kind: str, model_id: str):
    from transformers import AutoImageProcessor, AutoModel, AutoProcessor

    try:
        model = AutoModel.from_pretrained(model_id).eval()
        processor = (AutoProcessor if kind == "clip" else AutoImageProcessor).from_pretrained(model_id)
    except (OSError, ValueError) as error:
        raise MetricModelUnavailable(
            f"the metric model {model_id!r} cannot be loaded ({str(error).splitlines()[0]}); download it while "
            f"online (huggingface-cli download {model_id}) or pass the id of a local copy"
        ) from error
    return model, processor


def image_embeddings(images: Sequence, model_id: str = DINO_MODEL, kind: str = "dino") -> torch.Tensor:
    """Unit-norm embeddings (N, D): DINO's CLS token, or CLIP's image embedding (`kind="clip"`)."""
    model, processor = _load(kind, model_id)
    inputs = processor(images=[np.asarray(i) for i in images], return_tensors="pt")
    with torch.no_grad():
        if kind == "clip":
            features = model.get_image_features(pixel_values=inputs["pixel_values"])
            features = getattr(features, "pooler_output", features)
        else:
            features = model(pixel_values=inputs["pixel_values"]).last_hidden_state[:, 0]
    return F.normalize(features.float(), dim=-1)


def clip_score(images: Sequence, prompt: str, model_id: str = CLIP_MODEL) -> float:
    """Text alignment: 100 x cosine of CLIP image and text embeddings, mean over images (>= 0)."""
    model, processor = _load("clip", model_id)
    text = processor(text=[prompt], return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        features = model.get_text_features(
            input_ids=text["input_ids"], attention_mask=text.get("attention_mask")
        )
        features = getattr(features, "pooler_output", features)
    text_embedding = F.normalize(features.float(), dim=-1)
    similarity = image_embeddings(images, model_id, "clip") @ text_embedding.T
    return float(100 * similarity.clamp(min=0).mean())


def reference_similarity(image, reference, model_id: str = DINO_MODEL, kind: str = "dino") -> float:
    """CLIP-I (`kind="clip"`) or DINO cosine between an image and a reference."""
    embeddings = image_embeddings([image, reference], model_id, kind)
    return float(embeddings[0] @ embeddings[1])


# ---- video dynamics and consistency (consistency scores: higher is better)


def temporal_flickering(video) -> float:
    """VBench's temporal flickering: (255 - mean absolute difference of consecutive frames) / 255, 0-1,
    1 for a still video, higher is steadier (VBench scores it on static-scene prompts)."""
    return (255.0 - frame_difference(video)) / 255.0


def frame_difference(video) -> float:
    """Mean absolute difference of consecutive frames, 0-255 (0 for a still video): motion plus flicker."""
    frames = _frames(video).astype(np.float64)
    return 0.0 if len(frames) < 2 else float(np.abs(np.diff(frames, axis=0)).mean())


def flicker(video) -> float:
    """Deprecated: `frame_difference` (the same 0-255 value), or `temporal_flickering` (VBench's 0-1 score)."""
    import warnings

    warnings.warn(
        "attnpack.eval.flicker is frame_difference now (the same value); VBench's score is temporal_flickering",
        DeprecationWarning,
        stacklevel=2,
    )
    return frame_difference(video)


def optical_flow(a, b) -> np.ndarray:
    """Dense optical flow (H, W, 2) from frame a to frame b, in pixels (OpenCV DIS, medium preset, luma)."""
    import cv2

    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    return dis.calc(_gray(a).round().astype(np.uint8), _gray(b).round().astype(np.uint8), None)


def dynamic_degree(video) -> float:
    """Mean optical-flow magnitude between consecutive frames, in pixels (not VBench's dynamic degree, which is
    a yes / no per video from RAFT flow)."""
    frames = _frames(video)
    if len(frames) < 2:
        return 0.0
    return float(
        np.mean([np.linalg.norm(optical_flow(a, b), axis=-1).mean() for a, b in itertools.pairwise(frames)])
    )


def motion_smoothness(video) -> float:
    """VBench's motion smoothness with optical-flow interpolation in place of its AMT network: each odd frame
    is interpolated from its neighbours (each warped half-way along the flow between them, `optical_flow`,
    averaged) and compared with the real one; (255 - mean absolute error) / 255, 0-1, higher is smoother.
    Needs >= 3 frames."""
    import cv2

    frames = _frames(video)
    if len(frames) < 3:
        raise ValueError(f"motion smoothness needs at least 3 frames; the video has {len(frames)}")
    errors = []
    height, width = frames.shape[1:3]
    grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))

    def halfway(source, flow):
        return cv2.remap(source, grid_x - 0.5 * flow[..., 0], grid_y - 0.5 * flow[..., 1], cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE).astype(np.float64)  # fmt: skip

    for i in range(1, len(frames) - 1, 2):
        previous, middle, following = frames[i - 1], frames[i], frames[i + 1]
        predicted = 0.5 * (
            halfway(previous, optical_flow(previous, following))
            + halfway(following, optical_flow(following, previous))
        )
        errors.append(np.abs(np.clip(predicted.round(), 0, 255) - middle.astype(np.float64)).mean())
    return float((255.0 - np.mean(errors)) / 255.0)


def subject_consistency(video, model_id: str = VBENCH_DINO_MODEL, kind: str = "dino") -> float:
    """VBench's subject consistency: for each frame after the first, the mean of its cosine to the previous and
    to the first frame (each clamped at 0), averaged over those frames; DINO CLS features (VBench: DINO
    ViT-B/16, the default here; frames prepared by the model's own processor, where VBench resizes the short
    side to 224). 0-1, 1 for identical frames, higher is more consistent."""
    embeddings = image_embeddings(list(_frames(video)), model_id, kind)
    if len(embeddings) < 2:
        raise ValueError("subject consistency needs at least 2 frames")
    to_first = (embeddings[1:] @ embeddings[0]).clamp(min=0)
    to_previous = (embeddings[1:] * embeddings[:-1]).sum(-1).clamp(min=0)
    return float(((to_first + to_previous) / 2).mean())


# ---- trajectories and subjects


def colour_box_finder(colour: Sequence[int], tolerance: int = 60) -> Callable[[np.ndarray], Box | None]:
    """A simple box finder for tests and toy scenes: the bounding box of pixels near `colour`."""
    target = np.asarray(colour, np.int32)

    def find(frame: np.ndarray) -> Box | None:
        near = np.abs(frame.astype(np.int32) - target).max(axis=-1) <= tolerance
        rows, cols = np.nonzero(near.any(axis=1))[0], np.nonzero(near.any(axis=0))[0]
        if len(rows) == 0:
            return None
        height, width = near.shape
        return rows[0] / height, (rows[-1] + 1) / height, cols[0] / width, (cols[-1] + 1) / width

    return find


def box_iou(a: Box, b: Box) -> float:
    (ay1, ay2, ax1, ax2), (by1, by2, bx1, bx2) = a, b
    inter = max(0.0, min(ay2, by2) - max(ay1, by1)) * max(0.0, min(ax2, bx2) - max(ax1, bx1))
    union = (ay2 - ay1) * (ax2 - ax1) + (by2 - by1) * (bx2 - bx1) - inter
    return inter / union if union > 0 else 0.0


def trajectory_adherence(video, requested: Sequence[Box], finder: Callable[[np.ndarray], Box | None]) -> dict:
    """Centroid distance (normalised units) and mIoU between the requested box of each frame and the box
    `finder` finds; a frame where nothing is found counts IoU 0 and is left out of the distance."""
    frames = _frames(video)
    if len(requested) != len(frames):
        raise ValueError(f"requested has {len(requested)} boxes for {len(frames)} frames; give one per frame")
    distances, ious = [], []
    for frame, want in zip(frames, requested, strict=True):
        found = finder(frame)
        if found is None:
            ious.append(0.0)
            continue
        centre = lambda b: np.array([(b[0] + b[1]) / 2, (b[2] + b[3]) / 2])  # noqa: E731
        distances.append(float(np.linalg.norm(centre(found) - centre(want))))
        ious.append(box_iou(found, want))
    return {
        "centroid_distance": float(np.mean(distances)) if distances else float("nan"),
        "miou": float(np.mean(ious)),
        "found": len(distances) / len(frames),
    }


def crop(image, box: Box) -> np.ndarray:
    image = np.asarray(image)
    height, width = image.shape[:2]
    y1, y2, x1, x2 = box
    r0, c0 = int(y1 * height), int(x1 * width)
    return image[r0 : max(round(y2 * height), r0 + 1), c0 : max(round(x2 * width), c0 + 1)]


def subject_similarity(image, references: Sequence, boxes: Sequence[Box], model_id: str = DINO_MODEL,
                       kind: str = "dino") -> list[float]:  # fmt: skip
    """Per subject: similarity of its crop in `image` (its box) to its reference image."""
    return [
        reference_similarity(crop(image, box), ref, model_id, kind)
        for ref, box in zip(references, boxes, strict=True)
    ]
