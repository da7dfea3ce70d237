"""The built-in synthetic dataset: coloured shapes whose difficulty per image is known.

Each image shows one of ten shapes (the class). Its difficulty level decides how hard the shape
is to recognise: smaller, off-centre, rotated, lower contrast, with noise, clutter strokes and
occluding patches. A dynamic-depth model should spend fewer blocks on the easy levels; the
known level lets the evaluation check that it does. Generated in seconds, needs no download.
"""

from __future__ import annotations

import torch

# Signed distance in pixels (< 0 inside) of each shape class at local, rotated coordinates (u, v)
# for shape size r. Distance fields give anti-aliased edges for free: coverage = 0.5 - distance.

def _box(u, v, half_u, half_v):
    return torch.maximum(u.abs() - half_u, v.abs() - half_v)


def _plus(u, v, r):
    return torch.minimum(_box(u, v, r, 0.3 * r), _box(u, v, 0.3 * r, r))


def _triangle(u, v, r):  # equilateral, pointing up: the maximum over its three edges
    return torch.maximum(v, torch.maximum(0.866 * u - 0.5 * v, -0.866 * u - 0.5 * v)) - 0.6 * r


def _stripes(u, v, r):  # three horizontal bars
    bars = torch.minimum((v - 0.6 * r).abs(), torch.minimum(v.abs(), (v + 0.6 * r).abs())) - 0.17 * r
    return torch.maximum(u.abs() - 0.9 * r, bars)


SHAPES = {
    "disk": lambda u, v, r: torch.hypot(u, v) - 0.9 * r,
    "ring": lambda u, v, r: (torch.hypot(u, v) - 0.7 * r).abs() - 0.25 * r,
    "square": lambda u, v, r: _box(u, v, 0.8 * r, 0.8 * r),
    "hollow_square": lambda u, v, r: (torch.maximum(u.abs(), v.abs()) - 0.65 * r).abs() - 0.2 * r,
    "triangle": _triangle,
    "plus": _plus,
    "x_cross": lambda u, v, r: _plus((u + v) * 0.7071, (v - u) * 0.7071, r),
    "diamond": lambda u, v, r: (u.abs() + v.abs() - r) * 0.7071,
    "stripes": _stripes,
    "two_dots": lambda u, v, r: torch.minimum(torch.hypot(u - 0.5 * r, v), torch.hypot(u + 0.5 * r, v)) - 0.38 * r,
}
_MAX_STROKES = 3  # clutter strokes on the hardest level
_CHUNK = 2048  # images rendered at once: bounds memory; fixed, so results do not depend on it


def render_synthetic(
    num_images: int, num_classes: int = 10, image_size: int = 32, seed: int = 0, difficulty_levels: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Coloured shapes (disk, ring, square, ...) on a plain background, with a known difficulty.

    Returns ``(images uint8 (N, 3, H, W), labels (N,), difficulty (N,), class names)``.

    ``num_classes``: how many of the 10 shape classes (the first of ``SHAPES``) to use.
    ``seed``: the images are a deterministic function of the arguments; different seeds are
    independent draws, so give the train and test splits different seeds (``load_dataset`` uses
    ``2 * seed`` and ``2 * seed + 1``).
    ``difficulty_levels``: level 0 is large, centred, clean, high contrast; towards level L-1
    shapes get smaller, off-centre, more rotated (up to 15 degrees) and lower in contrast, with
    pixel noise, clutter strokes and occluding patches. Levels and classes are exactly balanced.
    """
    if not 1 <= num_classes <= len(SHAPES) or num_images < 0 or image_size < 8 or difficulty_levels < 1:
        raise ValueError(f"need 1 <= num_classes <= {len(SHAPES)}, num_images >= 0, image_size >= 8, difficulty_levels >= 1")
    g = torch.Generator().manual_seed(seed)  # a local generator: the global RNG stays untouched
    n, s = num_images, float(image_size)
    labels = torch.randperm(n, generator=g) % num_classes  # permutation mod k: exact balance
    difficulty = torch.randperm(n, generator=g) % difficulty_levels

    def uniform(low, high, *shape):
        return torch.rand((n,) + shape, generator=g) * (high - low) + low

    def colours(grey):  # RGB with mean brightness ``grey`` and a random tint
        tint = uniform(-0.25, 0.25, 3, 1, 1)
        return (grey[:, None, None, None] + tint - tint.mean(1, keepdim=True)).clamp(0, 1)

    # All parameters are drawn up front, shaped (n, 1, 1) to broadcast over the pixel grid.
    t = (difficulty.float() / max(difficulty_levels - 1, 1))[:, None, None]  # 0 easiest .. 1 hardest
    radius = s * (0.36 - 0.16 * t) * uniform(0.85, 1.1, 1, 1)
    shift = (s / 2 - radius - 1).clamp(min=1) * t + 1
    cx, cy = s / 2 + uniform(-1, 1, 1, 1) * shift, s / 2 + uniform(-1, 1, 1, 1) * shift
    angle = torch.deg2rad(uniform(-1, 1, 1, 1) * (5 + 10 * t))
    contrast = (0.8 - 0.5 * t[:, 0, 0]) * uniform(0.9, 1.1)
    mid = contrast / 2 + torch.rand(n, generator=g) * (1 - contrast)
    polarity = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    fg, bg = colours(mid + polarity * contrast / 2), colours(mid - polarity * contrast / 2)
    stroke_on = [(t * _MAX_STROKES).round() > k for k in range(_MAX_STROKES)]
    strokes = [uniform(0, s, 1, 1) for _ in range(4 * _MAX_STROKES)]  # x0, y0, x1, y1 per stroke
    stroke_width = [uniform(0.6, 1.2, 1, 1) for _ in range(_MAX_STROKES)]
    # Half the strokes take the shape's own colour, so they cannot be told apart by colour.
    stroke_colour = [torch.where(uniform(0, 1, 1, 1, 1) < 0.5, fg, uniform(0, 1, 3, 1, 1)) for _ in range(_MAX_STROKES)]
    occluded = uniform(0, 1, 1, 1) < 0.7 * t
    patch_cx, patch_cy = cx + uniform(-0.7, 0.7, 1, 1) * radius, cy + uniform(-0.7, 0.7, 1, 1) * radius
    patch_w, patch_h = uniform(0.25, 0.45, 1, 1) * radius, uniform(0.25, 0.45, 1, 1) * radius
    patch_colour = uniform(0, 1, 3, 1, 1)
    noise_std = 0.13 * t[:, None]

    ys, xs = torch.meshgrid(torch.arange(image_size) + 0.5, torch.arange(image_size) + 0.5, indexing="ij")
    images = torch.empty(n, 3, image_size, image_size, dtype=torch.uint8)
    for start in range(0, n, _CHUNK):
        c = slice(start, start + _CHUNK)
        cos, sin = angle[c].cos(), angle[c].sin()
        u = cos * (xs - cx[c]) + sin * (ys - cy[c])
        v = cos * (ys - cy[c]) - sin * (xs - cx[c])
        r = radius[c].expand_as(u)
        distance = torch.empty_like(u)
        for k, shape in enumerate(list(SHAPES.values())[:num_classes]):
            rows = labels[c] == k
            distance[rows] = shape(u[rows], v[rows], r[rows])
        img = _paint(bg[c].expand(-1, -1, image_size, image_size), fg[c], 0.5 - distance)
        for k in range(_MAX_STROKES):
            x0, y0, x1, y1 = (p[c] for p in strokes[4 * k : 4 * k + 4])
            coverage = stroke_width[k][c] + 0.5 - _segment_distance(xs, ys, x0, y0, x1, y1)
            img = _paint(img, stroke_colour[k][c], coverage * stroke_on[k][c])
        patch = _box(xs - patch_cx[c], ys - patch_cy[c], patch_w[c], patch_h[c])
        img = _paint(img, patch_colour[c], (0.5 - patch) * occluded[c])
        img = img + torch.randn(img.shape, generator=g) * noise_std[c]
        images[c] = (img * 255).round_().clamp_(0, 255).to(torch.uint8)
    return images, labels, difficulty, list(SHAPES)[:num_classes]


def _paint(img: torch.Tensor, colour: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """Paint ``colour`` (n, 3, 1, 1) over ``img`` (n, 3, H, W) where ``coverage`` (n, H, W) is > 0."""
    alpha = coverage.clamp(0, 1)[:, None]
    return img * (1 - alpha) + colour * alpha


def _segment_distance(xs, ys, x0, y0, x1, y1) -> torch.Tensor:
    """Distance of each pixel centre to the segment (x0, y0)-(x1, y1)."""
    ex, ey = x1 - x0, y1 - y0
    along = (((xs - x0) * ex + (ys - y0) * ey) / (ex * ex + ey * ey + 1e-6)).clamp(0, 1)
    return torch.hypot(xs - x0 - along * ex, ys - y0 - along * ey)
