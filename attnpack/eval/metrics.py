"""Quality metrics for images and videos: fidelity to the dense run, text and reference alignment, video
dynamics, trajectory adherence, subject consistency.

Images and frames are uint8 arrays (H, W, 3) or (F, H, W, 3). Metrics that need a model (CLIP, DINO,
LPIPS) load it by id through transformers / torchmetrics; an id that cannot be loaded (offline, missing)
raises `MetricModelUnavailable` naming it.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MODEL = "openai/clip-vit-base-patch32"
DINO_MODEL = "facebook/dinov2-small"

Box = tuple[float, float, float, float]  # y1, y2, x1, x2 in [0, 1] (the trajectory format)


class MetricModelUnavailable(RuntimeError):
    """A metric's model cannot be loaded; the message names the id and how to get it."""


def _frames(video) -> np.ndarray:
    array = np.asarray(video)
    return array[None] if array.ndim == 3 else array


# ---- fidelity to the dense run


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images or videos; inf when identical."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    _same_shape(a, b)
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(a, b) -> float:
    """Structural similarity (Gaussian window 11, σ 1.5, on luminance of each frame), mean over frames."""
    a, b = _frames(a), _frames(b)
    _same_shape(a, b)
    scores = [_ssim_gray(_gray(x), _gray(y)) for x, y in zip(a, b, strict=True)]
    return float(np.mean(scores))


def _ssim_gray(x: np.ndarray, y: np.ndarray) -> float:
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    window = _gaussian_window(11, 1.5)
    blur = lambda t: F.conv2d(t, window, padding=5)  # noqa: E731
    tx, ty = (torch.from_numpy(v)[None, None].double() for v in (x, y))
    mx, my = blur(tx), blur(ty)
    sxx, syy, sxy = blur(tx * tx) - mx**2, blur(ty * ty) - my**2, blur(tx * ty) - mx * my
    value = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return float(value[..., 5:-5, 5:-5].mean() if min(x.shape) > 10 else value.mean())


@functools.lru_cache(maxsize=4)
def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - size // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def lpips(a, b, net: str = "alex") -> float:
    """LPIPS (torchmetrics, which needs torchvision and the `net` weights), mean over frames."""
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        metric = LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True)
    except Exception as error:
        raise MetricModelUnavailable(
            f"LPIPS ({net!r} weights) cannot be loaded: {str(error).splitlines()[0] if str(error) else type(error).__name__}. "
            "It needs `pip install torchmetrics torchvision lpips` and the weights downloaded once while online"
        ) from error
    a, b = (torch.from_numpy(_frames(x)).permute(0, 3, 1, 2).float() / 255 for x in (a, b))
    with torch.no_grad():
        return float(metric(a, b))


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


# ---- video dynamics


def flicker(video) -> float:
    """Mean absolute difference of consecutive frames (0 for a still video)."""
    frames = _frames(video).astype(np.float64)
    return 0.0 if len(frames) < 2 else float(np.abs(np.diff(frames, axis=0)).mean())


def optical_flow(a, b) -> np.ndarray:
    """Dense Farneback flow (H, W, 2) from frame a to frame b (OpenCV)."""
    import cv2

    return cv2.calcOpticalFlowFarneback(
        _gray(a).astype(np.uint8), _gray(b).astype(np.uint8), None, 0.5, 3, 15, 3, 5, 1.2, 0
    )


def dynamic_degree(video) -> float:
    """Mean optical-flow magnitude between consecutive frames, in pixels."""
    frames = _frames(video)
    if len(frames) < 2:
        return 0.0
    return float(
        np.mean([np.linalg.norm(optical_flow(a, b), axis=-1).mean() for a, b in itertools.pairwise(frames)])
    )


def motion_smoothness(video) -> float:
    """Mean absolute error (0-255) of each middle frame predicted from its neighbours by warping along half the
    optical flow (lower is smoother)."""
    import cv2

    frames = _frames(video)
    if len(frames) < 3:
        return 0.0
    errors = []
    height, width = frames.shape[1:3]
    grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    for previous, middle, following in zip(frames, frames[1:], frames[2:], strict=False):
        flow = optical_flow(previous, following)
        map_x, map_y = grid_x - 0.5 * flow[..., 0], grid_y - 0.5 * flow[..., 1]
        predicted = cv2.remap(previous, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        errors.append(np.abs(predicted.astype(np.float64) - middle.astype(np.float64)).mean())
    return float(np.mean(errors))


def subject_consistency(video, model_id: str = DINO_MODEL, kind: str = "dino") -> dict[str, float]:
    """Cosine of each frame's embedding to the first and to the previous frame, means."""
    embeddings = image_embeddings(list(_frames(video)), model_id, kind)
    to_first = (embeddings[1:] @ embeddings[0]).mean()
    to_previous = (embeddings[1:] * embeddings[:-1]).sum(-1).mean()
    return {"to_first": float(to_first), "to_previous": float(to_previous)}


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
