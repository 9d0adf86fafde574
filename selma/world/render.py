"""Rendering scenes to 64×64 RGB images (numpy, PIL for the optional blur).

``render(scene)`` draws hard-edged shapes (a pixel takes an object's colour when its centre is
inside the shape). The options make harder, more "generated-looking" images for robustness
checks: ``supersample`` (anti-aliased soft edges: coverage from k×k samples per pixel),
``corner_radius`` (rounded square corners, as a fraction of half the side), ``blur`` (Gaussian
radius in pixels) and ``noise`` (Gaussian pixel noise, standard deviation in 0–255 units, seeded).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from selma.world.scene import BACKGROUND, CANVAS, COLORS, Scene, WorldObject


def shape_mask(obj: WorldObject, xs: np.ndarray, ys: np.ndarray, corner_radius: float = 0.0) -> np.ndarray:
    """Whether the points (xs, ys) lie inside ``obj``."""
    half = obj.size / 2
    dx, dy = xs - obj.cx, ys - obj.cy
    if obj.shape == "circle":
        return dx * dx + dy * dy <= half * half
    if obj.shape == "square":
        radius = min(max(corner_radius, 0.0), 1.0) * half
        inner = half - radius
        ox, oy = np.maximum(np.abs(dx) - inner, 0.0), np.maximum(np.abs(dy) - inner, 0.0)
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
        return inside & (ox * ox + oy * oy <= radius * radius) if radius > 0 else inside
    if obj.shape == "triangle":
        # Upright: apex at the top centre, base along the bottom of the box.
        depth = dy + half  # 0 at the apex, size at the base
        return (depth >= 0) & (depth <= obj.size) & (np.abs(dx) <= depth / 2)
    if obj.shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= half
    if obj.shape == "cross":
        # A plus sign whose arms are a third of the side wide.
        arm = half / 3
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= half)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= half))
    raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene: Scene, *, size: int = CANVAS, supersample: int = 1, corner_radius: float = 0.0,
           blur: float = 0.0, noise: float = 0.0, noise_seed: int | None = None) -> np.ndarray:
    """The scene as a ``size``×``size``×3 uint8 array (``size`` rescales the 64-pixel canvas)."""
    if supersample < 1:
        raise ValueError("supersample must be >= 1")
    scale = size / CANVAS
    k = int(supersample)
    grid = (np.arange(size * k) + 0.5) / (k * scale)
    xs, ys = np.meshgrid(grid, grid)
    image = np.empty((size, size, 3), np.float64)
    image[:] = BACKGROUND
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.bbox
        # Only the pixels around the object's box.
        c0, r0 = max(int(np.floor(x0 * scale)) - 1, 0), max(int(np.floor(y0 * scale)) - 1, 0)
        c1, r1 = min(int(np.ceil(x1 * scale)) + 1, size), min(int(np.ceil(y1 * scale)) + 1, size)
        window = shape_mask(obj, xs[r0 * k:r1 * k, c0 * k:c1 * k], ys[r0 * k:r1 * k, c0 * k:c1 * k], corner_radius)
        coverage = window.reshape(r1 - r0, k, c1 - c0, k).mean(axis=(1, 3))[..., None]
        patch = image[r0:r1, c0:c1]
        image[r0:r1, c0:c1] = patch * (1 - coverage) + np.asarray(COLORS[obj.color], np.float64) * coverage
    if blur > 0:
        blurred = Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(blur))
        image = np.asarray(blurred, np.float64)
    if noise > 0:
        seed = noise_seed if noise_seed is not None else scene.seed
        image = image + np.random.default_rng(seed).normal(0.0, noise, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_image(scene: Scene, **options):
    """:func:`render` as a PIL image."""
    return Image.fromarray(render(scene, **options))
