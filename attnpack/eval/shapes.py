"""Finding the procedural world's shapes in a picture (OpenCV), to score what the toy models make: are the
captioned colours and shapes there, on the right background, and where.

Each pixel takes the nearest colour of the world's palette (object colours and background colours kept
apart); each object colour's mask is cleaned of one-pixel seams (the blend at edges) and split into
connected components; each component is classified by IoU with the world's own shape masks fitted to its
bounding box, and sized by its box's longer side against the world's two sizes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..training.world import BACKGROUNDS, COLOURS, SHAPES, SIZES, Scene, _mask, parse_caption

Box = tuple[float, float, float, float]  # y1, y2, x1, x2 in [0, 1], the trajectory format
MIN_AREA = 0.004  # of the image: smaller components are edge debris (a small world shape is >= 0.013)
TEMPLATE_SIDE = 32


@dataclass(frozen=True)
class Detection:
    colour: str
    shape: str
    size: str
    box: Box
    area: float  # fraction of the image
    fit: float  # IoU with the shape's template: how sure the shape is

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[1]) / 2, (self.box[2] + self.box[3]) / 2


def _palette() -> tuple[list[str], np.ndarray]:
    names = list(COLOURS) + [f"background:{name}" for name in BACKGROUNDS]
    return names, np.array([*COLOURS.values(), *BACKGROUNDS.values()], np.float32)


def colour_labels(image: np.ndarray) -> np.ndarray:
    """Index into `_palette()` of the nearest colour, per pixel."""
    _, colours = _palette()
    pixels = np.asarray(image, np.float32)[..., :3]
    distance = ((pixels[..., None, :] - colours) ** 2).sum(-1)
    return distance.argmin(-1)


@functools.lru_cache(maxsize=1)
def _templates() -> dict[str, np.ndarray]:
    """Each shape's mask cropped to its own bounding box and resized to TEMPLATE_SIDE²."""
    import cv2

    out = {}
    for shape in SHAPES:
        mask = _mask(shape, 4 * TEMPLATE_SIDE)
        rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
        crop = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.uint8)
        out[shape] = cv2.resize(crop, (TEMPLATE_SIDE, TEMPLATE_SIDE), interpolation=cv2.INTER_AREA) >= 0.5
    return out


def classify_shape(component: np.ndarray) -> tuple[str, float]:
    """(shape, IoU) of a bool mask cropped to its bounding box."""
    import cv2

    fitted = (
        cv2.resize(component.astype(np.float32), (TEMPLATE_SIDE, TEMPLATE_SIDE), interpolation=cv2.INTER_AREA)
        >= 0.5
    )
    scores = {
        shape: float((fitted & template).sum() / max((fitted | template).sum(), 1))
        for shape, template in _templates().items()
    }
    best = max(scores, key=scores.get)
    return best, scores[best]


def detect_objects(image: np.ndarray, *, min_area: float = MIN_AREA) -> list[Detection]:
    """Every object-coloured blob of `image` (H, W, 3 uint8), largest first."""
    import cv2

    image = np.asarray(image)
    height, width = image.shape[:2]
    labels = colour_labels(image)
    small, large = SIZES["small"], SIZES["large"]
    found = []
    for index, colour in enumerate(COLOURS):
        mask = (labels == index).astype(np.uint8)
        if mask.sum() < min_area * height * width:
            continue
        # Components of the opened mask, so that seams do not join or count as objects; each then takes
        # back its own thin parts (a triangle's tip, a star's points) from the mask as it was.
        opened = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((2, 2), np.uint8))
        count, components = cv2.connectedComponents(opened, connectivity=4)
        for c in range(1, count):
            region = (components == c).astype(np.uint8)
            for _ in range(3):  # a few pixels back, never far enough to reach a neighbour across a seam
                region = cv2.dilate(region, np.ones((3, 3), np.uint8)) & mask
            area = int(region.sum())
            if area < min_area * height * width:
                continue
            rows, cols = np.nonzero(region.any(1))[0], np.nonzero(region.any(0))[0]
            y, h, x, w = rows[0], rows[-1] + 1 - rows[0], cols[0], cols[-1] + 1 - cols[0]
            shape, fit = classify_shape(region[y : y + h, x : x + w].astype(bool))
            side = max(h / height, w / width)
            found.append(
                Detection(
                    colour=colour,
                    shape=shape,
                    size="small" if side < (small + large) / 2 else "large",
                    box=(y / height, (y + h) / height, x / width, (x + w) / width),
                    area=area / (height * width),
                    fit=fit,
                )
            )
    return sorted(found, key=lambda d: -d.area)


def background_colour(image: np.ndarray) -> str:
    """The background's colour name: the most common background-palette label over the border pixels."""
    names, _ = _palette()
    labels = colour_labels(image)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    border = border[border >= len(COLOURS)]
    if len(border) == 0:
        return "none"
    return names[np.bincount(border).argmax()].split(":", 1)[1]


def scene_adherence(image: np.ndarray, scene: Scene | str) -> dict[str, float]:
    """How much of a caption one image shows: the share of captioned objects whose colour is there, whose
    colour and shape are there (one blob), and with the size too; the background (1 or 0); `exact`: every
    object with colour and shape, and the background."""
    scene = parse_caption(scene) if isinstance(scene, str) else scene
    detections = detect_objects(image)
    colour = shape = size = 0
    for thing in scene.things:
        same = [d for d in detections if d.colour == thing.colour]
        colour += bool(same)
        shaped = [d for d in same if d.shape == thing.shape]
        shape += bool(shaped)
        size += any(d.size == thing.size for d in shaped) if thing.size else bool(shaped)
    n = len(scene.things)
    background = 1.0 if scene.background is None else float(background_colour(image) == scene.background)
    return {
        "colour": colour / n,
        "shape": shape / n,
        "size": size / n,
        "background": background,
        "exact": float(shape == n and background == 1.0),
    }


def mean_scores(scores: list[dict[str, float]]) -> dict[str, float]:
    """Key by key means of a list of score dicts (the keys of the first)."""
    if not scores:
        return {}
    return {key: float(np.mean([s[key] for s in scores])) for key in scores[0]}


def object_finder(colour: str, shape: str | None = None) -> Callable[[np.ndarray], Box | None]:
    """A box finder for `trajectory_adherence`: the largest blob of `colour` (and `shape`, when given)."""
    if colour not in COLOURS:
        raise ValueError(f"colour={colour!r} is not a world colour; accepted: {', '.join(COLOURS)}")

    def find(frame: np.ndarray) -> Box | None:
        for d in detect_objects(frame):
            if d.colour == colour and (shape is None or d.shape == shape):
                return d.box
        return None

    return find


def main_object(image: np.ndarray, box: Box | None = None) -> Detection | None:
    """The largest blob of `image`, or of its crop to `box` (box in the crop's own coordinates then)."""
    from .metrics import crop

    found = detect_objects(crop(image, box) if box is not None else image)
    return found[0] if found else None
