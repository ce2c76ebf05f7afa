"""``shapes``: a deterministic, procedural COCO-format instance-segmentation dataset.

Several classes of filled shapes on textured, noisy backgrounds, from tiny (< 16 px) to large (> 40 % of the
image), overlapping and occluding each other. Annotations are the *visible* part of each object as polygons
(COCO ``segmentation``), its tight box and area. Everything derives from one seed, so the same seed and
parameters give byte-identical files. No detectron2 here: only numpy, OpenCV, json and tqdm.
"""
import dataclasses
import hashlib
import json
import math
import os
from typing import Dict, List, Optional

import cv2
import numpy as np
from tqdm import tqdm

__all__ = ["SHAPES_CLASSES", "SOURCE_CLASSES", "ShapesParams", "render_image", "generate_shapes_split",
           "shapes_split_dir", "shapes_split_files", "default_shapes_root"]

SHAPES_CLASSES = ("circle", "triangle", "square", "star", "hexagon", "cross")
# The source set of the pretrained trunk (tools/pretrain_trunk.py): other shape families, none of the six above,
# rendered the same way, so that what transfers is what ImageNet gives COCO: edges, corners, textures and scale,
# not the target classes.
SOURCE_CLASSES = ("pentagon", "octagon", "ellipse", "rhombus", "arrow", "ell", "tee", "crescent")

# Object size classes (fraction of the image side of the object's bounding square) and their sampling weights:
# tiny objects (< 16 px at the default 192 px), medium, and large ones covering > 40 % of the image area.
_SIZE_BINS = ((0.05, 0.08), (0.08, 0.2), (0.2, 0.5), (0.6, 0.9))
_SIZE_WEIGHTS = (0.2, 0.35, 0.3, 0.15)
_MIN_VISIBLE_FRACTION = 0.4  # an object more occluded than this is removed (and its pixels stay painted over)
_MIN_AREA = 6.0  # visible pixels below which an object is dropped


@dataclasses.dataclass(frozen=True)
class ShapesParams:
    """Size and difficulty of one split. ``difficulty`` in [0, 1] scales background texture and noise, lowers
    object/background contrast and allows more occlusion."""

    num_images: int = 2000
    image_size: int = 192
    min_objects: int = 2
    max_objects: int = 8
    difficulty: float = 0.5
    seed: int = 0

    def validate(self):
        if not isinstance(self.num_images, int) or self.num_images < 1:
            raise ValueError(f"num_images must be a positive integer, got {self.num_images!r}")
        if not isinstance(self.image_size, int) or not 32 <= self.image_size <= 4096:
            raise ValueError(f"image_size must be an integer in [32, 4096], got {self.image_size!r}")
        if not (isinstance(self.min_objects, int) and isinstance(self.max_objects, int)) or not (
            0 <= self.min_objects <= self.max_objects <= 100
        ):
            raise ValueError(
                f"need 0 <= min_objects <= max_objects <= 100, got {self.min_objects!r}, {self.max_objects!r}"
            )
        if not (isinstance(self.difficulty, (int, float)) and 0.0 <= self.difficulty <= 1.0):
            raise ValueError(f"difficulty must be in [0, 1], got {self.difficulty!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        return self

    def key(self) -> str:
        """Short digest naming the cache folder of these parameters."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:10]


def _shape_polygon(cls: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Vertices (V, 2) of a shape of circumradius r centred at (cx, cy), rotated by angle."""
    if cls == "circle":
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif cls == "triangle":
        t = np.array([0, 2, 4]) * math.pi / 3 - math.pi / 2
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif cls == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) / math.sqrt(2)
    elif cls == "star":
        t = np.arange(10) * math.pi / 5 - math.pi / 2
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = np.stack([rad * np.cos(t), rad * np.sin(t)], 1)
    elif cls == "hexagon":
        t = np.arange(6) * math.pi / 3
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif cls == "cross":
        a, b = 1.0 / math.sqrt(1 + 0.35**2), 0.35 / math.sqrt(1 + 0.35**2)
        pts = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b], [-a, b],
                        [-a, -b], [-b, -b]])
    elif cls in _SOURCE_POLYGONS:
        pts = _SOURCE_POLYGONS[cls]
    else:
        raise ValueError(f"unknown shape class {cls!r}")
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return pts @ rot.T * r + np.array([cx, cy])


def _regular(n: int, phase: float = 0.0) -> np.ndarray:
    t = np.arange(n) * 2 * math.pi / n + phase
    return np.stack([np.cos(t), np.sin(t)], 1)


def _crescent() -> np.ndarray:
    """A disc minus a shifted disc: the outer arc, then the inner arc back (unit circumradius)."""
    outer = np.linspace(0.35 * math.pi, 1.65 * math.pi, 32)
    inner = np.linspace(1.45 * math.pi, 0.55 * math.pi, 24)
    return np.concatenate([np.stack([np.cos(outer), np.sin(outer)], 1),
                           np.stack([0.45 + 0.75 * np.cos(inner), 0.75 * np.sin(inner)], 1)])


_SOURCE_POLYGONS = {  # unit-circumradius vertices of SOURCE_CLASSES
    "pentagon": _regular(5, -math.pi / 2),
    "octagon": _regular(8, math.pi / 8),
    "ellipse": _regular(48) * np.array([1.0, 0.5]),
    "rhombus": np.array([[0, -1], [0.55, 0], [0, 1], [-0.55, 0]], dtype=np.float64),
    "arrow": np.array([[-1, -0.2], [0.2, -0.2], [0.2, -0.6], [1, 0], [0.2, 0.6], [0.2, 0.2], [-1, 0.2]]),
    "ell": np.array([[-0.7, -0.7], [-0.3, -0.7], [-0.3, 0.3], [0.7, 0.3], [0.7, 0.7], [-0.7, 0.7]]),
    "tee": np.array([[-0.7, -0.7], [0.7, -0.7], [0.7, -0.35], [0.18, -0.35], [0.18, 0.7], [-0.18, 0.7],
                     [-0.18, -0.35], [-0.7, -0.35]]),
    "crescent": _crescent(),
}


def _background(rng: np.random.Generator, size: int, difficulty: float) -> np.ndarray:
    """Smooth colour gradient + blurred blobs + random strokes + pixel noise, uint8 (size, size, 3)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
    w = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))[..., None]
    w = (w - w.min()) / max(float(w.max() - w.min()), 1e-6)
    img = c0 * (1 - w) + c1 * w
    coarse = rng.normal(0, 1, (max(2, size // 16), max(2, size // 16), 3)).astype(np.float32)
    img += cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC) * (30 * difficulty)
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(0, 1 + int(8 * difficulty)))):  # distractor strokes, not objects
        p0, p1 = rng.integers(0, size, 2), rng.integers(0, size, 2)
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        cv2.line(img, (int(p0[0]), int(p0[1])), (int(p1[0]), int(p1[1])), color, int(rng.integers(1, 3)))
    noise = rng.normal(0, 2 + 14 * difficulty, img.shape)
    return np.clip(img.astype(np.float64) + noise, 0, 255).astype(np.uint8)


def _contrast_color(rng: np.random.Generator, under: np.ndarray, difficulty: float) -> np.ndarray:
    """An object colour at least a difficulty-dependent distance from the mean colour beneath it."""
    min_dist = 40 + 100 * (1 - difficulty)
    best, best_d = None, -1.0
    for _ in range(16):
        c = rng.uniform(0, 255, 3)
        d = float(np.linalg.norm(c - under))
        if d >= min_dist:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


def _mask_to_polygons(mask: np.ndarray) -> List[List[float]]:
    """Outer contours of a binary mask as COCO polygons (each >= 3 points), in pixel-corner coordinates."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = []
    for c in contours:
        c = c.reshape(-1, 2).astype(np.float64)
        if len(c) < 3 or cv2.contourArea(c.astype(np.float32)) < 1.0:
            continue
        # contour points are pixel centres of boundary pixels; +0.5 puts them on the pixel-grid edges' midline
        polys.append([round(float(v), 2) for v in (c + 0.5).reshape(-1)])
    return polys


def render_image(rng: np.random.Generator, p: ShapesParams, classes=SHAPES_CLASSES):
    """One image (uint8 RGB) and its visible-object annotations (``category_id`` = 1 + index in ``classes``,
    polygons, box, area), drawn from ``rng``."""
    size = p.image_size
    img = _background(rng, size, p.difficulty)
    n = int(rng.integers(p.min_objects, p.max_objects + 1))
    owner = np.full((size, size), -1, dtype=np.int32)  # which object is visible at each pixel
    objects = []
    for k in range(n):
        b = int(rng.choice(len(_SIZE_BINS), p=_SIZE_WEIGHTS))
        side = rng.uniform(*_SIZE_BINS[b]) * size
        r = side / 2
        cx, cy = rng.uniform(0.1 * size, 0.9 * size, 2)  # may stick out of the image: truncated objects
        cls = int(rng.integers(len(classes)))
        poly = _shape_polygon(classes[cls], cx, cy, r, rng.uniform(0, 2 * math.pi))
        full = np.zeros((size, size), np.uint8)
        cv2.fillPoly(full, [np.round(poly * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
        if full.sum() < _MIN_AREA:
            continue
        under = img[full.astype(bool)].reshape(-1, 3).mean(0)
        color = _contrast_color(rng, under, p.difficulty)
        shade = (rng.normal(0, 6 + 10 * p.difficulty, (size, size, 1)) + color).clip(0, 255)
        sel = full.astype(bool)
        img[sel] = shade[sel[..., None].repeat(3, 2)].reshape(-1, 3).astype(np.uint8)
        owner[sel] = k
        objects.append((k, cls, int(full.sum())))
    # soft edges: a light blur so boundaries are not single-pixel exact
    img = cv2.GaussianBlur(img, (3, 3), 0.6 + 0.6 * p.difficulty)
    annos = []
    max_occlusion = 1 - _MIN_VISIBLE_FRACTION * (1.5 - p.difficulty)
    for k, cls, full_area in objects:
        vis = owner == k
        area = float(vis.sum())
        if area < _MIN_AREA or area < (1 - max_occlusion) * full_area:
            continue
        polys = _mask_to_polygons(vis)
        if not polys:
            continue
        ys, xs = np.nonzero(vis)
        x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
        annos.append({"category_id": cls + 1, "segmentation": polys, "area": area,
                      "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0})
    return img, annos


def shapes_split_dir(root: str, split: str, params: ShapesParams) -> str:
    return os.path.join(root, f"{split}_{params.key()}")


def shapes_split_files(root: str, split: str, params: ShapesParams) -> Dict[str, str]:
    """Where ``split`` lives (generated or not): ``{"json_file": ..., "image_root": ...}``."""
    out = shapes_split_dir(root, split, params)
    return {"json_file": os.path.join(out, "annotations.json"), "image_root": os.path.join(out, "images")}


def generate_shapes_split(root: str, split: str, params: ShapesParams, progress: bool = True,
                          classes=SHAPES_CLASSES) -> Dict[str, str]:
    """Write ``split`` (images/*.png + annotations.json) under ``root`` once; later calls reuse the files.

    Returns ``{"json_file": ..., "image_root": ...}``. The split's own seed is derived from ``params.seed`` and
    the split name, so train and val never share images. ``classes``: the shape families drawn (the source set's
    splits draw ``SOURCE_CLASSES``).
    """
    params.validate()
    files = shapes_split_files(root, split, params)
    json_file, image_root = files["json_file"], files["image_root"]
    if os.path.exists(json_file):
        return files
    os.makedirs(image_root, exist_ok=True)
    split_seed = int.from_bytes(hashlib.sha1(f"{params.seed}/{split}".encode()).digest()[:4], "little")
    images, annotations = [], []
    where = os.path.dirname(json_file)
    for i in tqdm(range(params.num_images), desc=f"generating shapes '{split}' in {where}", unit="image",
                  disable=not progress):
        rng = np.random.default_rng([split_seed, i])
        img, annos = render_image(rng, params, classes)
        fname = f"{i:06d}.png"
        tmp_image = os.path.join(image_root, f".{i:06d}.{os.getpid()}.png")
        cv2.imwrite(tmp_image, img[:, :, ::-1])  # RGB -> BGR for OpenCV
        os.replace(tmp_image, os.path.join(image_root, fname))  # a reader never sees a half-written image
        images.append({"id": i + 1, "file_name": fname, "width": params.image_size, "height": params.image_size})
        for a in annos:
            annotations.append(dict(a, id=len(annotations) + 1, image_id=i + 1))
    coco = {
        "info": {"description": f"d2_refine shapes ({split})", "params": dataclasses.asdict(params)},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(classes)],
    }
    tmp = f"{json_file}.{os.getpid()}.tmp"  # one per process: two trainings may generate the same split at once
    with open(tmp, "w") as f:
        json.dump(coco, f, sort_keys=True)
    os.replace(tmp, json_file)  # atomic: a half-written split is never taken as done
    return files


def default_shapes_root(root: Optional[str] = None) -> str:
    """``root`` if given, else $DETECTRON2_DATASETS/shapes, else ~/.cache/d2_refine/shapes."""
    if root:
        return os.path.expanduser(root)
    if os.environ.get("DETECTRON2_DATASETS"):
        return os.path.join(os.path.expanduser(os.environ["DETECTRON2_DATASETS"]), "shapes")
    return os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")), "d2_refine", "shapes")
