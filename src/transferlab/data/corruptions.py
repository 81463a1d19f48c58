"""The CIFAR-10-C corruptions (Hendrycks & Dietterich 2019, "Benchmarking Neural Network Robustness to Common
Corruptions"), with the CIFAR-10 parameters per severity of their `make_cifar_c.py`, re-implemented with numpy and
PIL only (no scipy, OpenCV, scikit-image or ImageMagick: none is a dependency of transferlab).

Each corruption is a pure function `f(images, severity, rng)`: uint8 images H x W x 3 or a batch N x H x W x 3,
severity 1..5, a numpy Generator (the only source of randomness), returning uint8 of the same shape. Arithmetic is
elementwise float32 numpy (no threaded reductions), so a result is the same in every process.

Left out: frost (needs the paper's frost photographs, which transferlab does not ship), snow and spatter (built
on OpenCV's and ImageMagick's filters), glass blur (a sequential per-pixel swap loop, which does not vectorise).
Where the original calls a library filter, this is the filter's definition: motion blur is ImageMagick's
one-sided Gaussian line kernel, zoom uses scipy's corner-aligned bilinear zoom, the blurs' borders are those of
the original (scikit-image: nearest; OpenCV: reflect-101). Cost for the 60,000 CIFAR-10 images: docs/shifted_target.md.

`corrupt_split` makes a split's noise reproducible: image i of a split gets its noise from a generator seeded
with (seed, corruption, severity, split, i // CHUNK) and its position in that chunk, so it depends on nothing
else (not the process, the run's seed, nor which images a run later selects).
"""

import difflib
import hashlib
import io
from collections.abc import Callable
from typing import Literal

import numpy as np
from PIL import Image

from transferlab.core.checks import show, whole_number
from transferlab.core.errors import UserError

CHUNK = 1000  # images per generator in corrupt_split (part of what the noise of image i is: see the docstring)
RECIPE_VERSION = 1  # bump when a corruption's result changes: it enters the data hash and the cache key

Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]
Pad = Literal["edge", "reflect", "symmetric"]  # np.pad modes: nearest, reflect-101, half-sample symmetric


# -- helpers ---------------------------------------------------------------------------------------------
def _float(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 255.0


def _uint8(x: np.ndarray) -> np.ndarray:
    """[0, 1] floats back to uint8, truncating as the original's np.uint8(...) does (plus a little, so that
    float32 rounding does not turn 100 into 99.99 and then 99)."""
    return (np.clip(x, 0.0, 1.0) * 255.0 + 1e-3).astype(np.uint8)


def _batched(fn: Corruption) -> Corruption:
    """Let `fn` (written for N x H x W x 3) take a single H x W x 3 image too."""

    def wrapper(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
        images = np.asarray(images)
        return fn(images[None], severity, rng)[0] if images.ndim == 3 else fn(images, severity, rng)

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


def _correlate(x: np.ndarray, kernel: np.ndarray, mode: Pad) -> np.ndarray:
    """2-D correlation of N x H x W [x C] with `kernel` (odd sides), borders padded by np.pad's `mode`."""
    ry, rx = kernel.shape[0] // 2, kernel.shape[1] // 2
    h, w = x.shape[1:3]
    pad = [(0, 0), (ry, ry), (rx, rx)] + [(0, 0)] * (x.ndim - 3)
    padded = np.pad(x, pad, mode=mode)
    out = np.zeros_like(x)
    for (dy, dx), k in np.ndenumerate(kernel):
        if k != 0:
            out += np.float32(k) * padded[:, dy : dy + h, dx : dx + w]
    return out


def _gaussian_1d(sigma: float, truncate: float) -> np.ndarray:
    radius = int(truncate * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return taps / taps.sum()


def _gaussian_filter(x: np.ndarray, sigma: float, truncate: float = 4.0, mode: Pad = "edge") -> np.ndarray:
    """scikit-image's / scipy's Gaussian filter over the two spatial axes (separable)."""
    if sigma <= 0:
        return x
    taps = _gaussian_1d(sigma, truncate)
    return _correlate(_correlate(x, taps[None, :], mode), taps[:, None], mode)


def _zoom_matrix(size: int, factor: float) -> np.ndarray:
    """size x size matrix of the original's clipped zoom along one axis: the centre ceil(size / factor) pixels
    zoomed by `factor` (corner-aligned bilinear, as scipy.ndimage.zoom with order=1), centre `size` kept."""
    crop = int(np.ceil(size / factor))
    top = (size - crop) // 2
    out = int(round(crop * factor))
    trim = (out - size) // 2
    src = top + (np.arange(size) + trim) * (crop - 1) / (out - 1)
    lo = np.floor(src).astype(int)
    frac = src - lo
    m = np.zeros((size, size), np.float32)
    m[np.arange(size), np.clip(lo, 0, size - 1)] += 1 - frac
    m[np.arange(size), np.clip(lo + 1, 0, size - 1)] += frac
    return m


def _bilinear(x: np.ndarray, rows: np.ndarray, cols: np.ndarray, border: str) -> np.ndarray:
    """Sample N x H x W x C at per-image coordinates `rows`, `cols` (N x H x W); out-of-range neighbours taken
    by `border`: "reflect101" (OpenCV's default) or "symmetric" (scipy's `reflect`)."""
    n, h, w = x.shape[:3]

    def fold(i: np.ndarray, size: int) -> np.ndarray:
        if border == "reflect101":
            period = 2 * (size - 1)
            i = np.mod(i, period)
            return np.where(i >= size, period - i, i)
        i = np.mod(i, 2 * size)
        return np.where(i >= size, 2 * size - 1 - i, i)

    r0, c0 = np.floor(rows), np.floor(cols)
    fr, fc = (rows - r0)[..., None], (cols - c0)[..., None]
    r0, c0 = r0.astype(int), c0.astype(int)
    ra, rb, ca, cb = fold(r0, h), fold(r0 + 1, h), fold(c0, w), fold(c0 + 1, w)
    k = np.arange(n)[:, None, None]
    top = x[k, ra, ca] * (1 - fc) + x[k, ra, cb] * fc
    bottom = x[k, rb, ca] * (1 - fc) + x[k, rb, cb] * fc
    return (top * (1 - fr) + bottom * fr).astype(np.float32)


def _per_image(images: np.ndarray, fn: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(fn(Image.fromarray(img)).convert("RGB")) for img in images])


# -- noise -----------------------------------------------------------------------------------------------
@_batched
def gaussian_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = [0.04, 0.06, 0.08, 0.09, 0.10][severity - 1]
    x = _float(images)
    return _uint8(x + rng.normal(scale=c, size=x.shape).astype(np.float32))


@_batched
def shot_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = [500, 250, 100, 75, 50][severity - 1]
    return _uint8(rng.poisson(_float(images) * c).astype(np.float32) / c)


@_batched
def impulse_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Salt and pepper on a fraction of the values (each channel on its own, as scikit-image's `s&p`)."""
    amount = [0.01, 0.02, 0.03, 0.05, 0.07][severity - 1]
    hit, salt = rng.random(images.shape) < amount, rng.random(images.shape) < 0.5
    return np.where(hit, np.where(salt, 255, 0), images).astype(np.uint8)


@_batched
def speckle_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = [0.06, 0.1, 0.12, 0.16, 0.2][severity - 1]
    x = _float(images)
    return _uint8(x + x * rng.normal(scale=c, size=x.shape).astype(np.float32))


# -- blur ------------------------------------------------------------------------------------------------
@_batched
def gaussian_blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    sigma = [0.4, 0.6, 0.7, 0.8, 1.0][severity - 1]
    return _uint8(_gaussian_filter(_float(images), sigma))


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    """The original's defocus kernel: an aliased disk on a 17 x 17 grid, smoothed by a 3 x 3 Gaussian
    (OpenCV's GaussianBlur, reflect-101 borders), normalised; zero rows and columns trimmed (they add nothing)."""
    span = np.arange(-8, 9)
    yy, xx = np.meshgrid(span, span, indexing="ij")
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float32)
    disk /= disk.sum()
    taps = np.exp(-0.5 * (np.arange(-1, 2) / alias_blur) ** 2)
    taps /= taps.sum()
    kernel = _correlate(_correlate(disk[None], taps[None, :], "reflect"), taps[:, None], "reflect")[0]
    keep = np.nonzero(kernel.any(axis=0))[0]
    r = max(8 - keep.min(), keep.max() - 8)
    return kernel[8 - r : 9 + r, 8 - r : 9 + r]


@_batched
def defocus_blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    radius, alias = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][severity - 1]
    return _uint8(_correlate(_float(images), _disk(radius, alias), "reflect"))


@_batched
def motion_blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """ImageMagick's MotionBlurImage (what the original calls through Wand): a one-sided line of 2 radius + 1
    taps with Gaussian weights exp(-i^2 / 2 sigma^2), at an angle uniform in [-45, 45] degrees per image; edge
    pixels repeat past the border."""
    radius, sigma = [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)][severity - 1]
    width = 2 * radius + 1
    weights = np.exp(-(np.arange(width) ** 2) / (2 * sigma**2))
    weights /= weights.sum()
    angles = np.deg2rad(rng.uniform(-45, 45, size=len(images)))
    steps = np.arange(width)[None, :]
    dx = np.ceil(steps * np.cos(angles)[:, None] - 0.5).astype(int)  # N x width
    dy = np.ceil(steps * np.sin(angles)[:, None] - 0.5).astype(int)
    n, h, w = images.shape[:3]
    x = _float(images)
    rows, cols, k = np.arange(h)[None, :, None], np.arange(w)[None, None, :], np.arange(n)[:, None, None]
    out = np.zeros_like(x)
    for i in range(width):
        r = np.clip(rows + dy[:, i, None, None], 0, h - 1)
        c = np.clip(cols + dx[:, i, None, None], 0, w - 1)
        out += np.float32(weights[i]) * x[k, r, c]
    return _uint8(out)


@_batched
def zoom_blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """The mean of the image and its centre zoomed by 1, 1.01, ... up to the severity's largest factor."""
    top = [1.06, 1.11, 1.16, 1.21, 1.26][severity - 1]
    x = _float(images)
    out = x.copy()
    factors = np.arange(1, top, 0.01)
    for factor in factors:
        zy, zx = _zoom_matrix(x.shape[1], factor), _zoom_matrix(x.shape[2], factor)
        out += np.einsum("ph,nhwc,qw->npqc", zy, x, zx, optimize=True)
    return _uint8(out / (len(factors) + 1))


# -- weather and digital ---------------------------------------------------------------------------------
def plasma_fractal(n: int, rng: np.random.Generator, size: int = 32, decay: float = 3.0) -> np.ndarray:
    """n height maps size x size in [0, 1] by the diamond-square algorithm, as the original's plasma_fractal:
    each midpoint is the mean of its four neighbours plus uniform noise that shrinks by `decay` per level."""
    m = np.zeros((n, size, size))
    step, wibble = size, 100.0

    def wibbled(total: np.ndarray) -> np.ndarray:
        return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        corners = m[:, 0::step, 0::step]
        squares = corners + np.roll(corners, -1, axis=1)
        squares = squares + np.roll(squares, -1, axis=2)
        m[:, half::step, half::step] = wibbled(squares)
        centres, corners = m[:, half::step, half::step], m[:, 0::step, 0::step]
        across = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=2)
        m[:, 0::step, half::step] = wibbled(across)
        down = centres + np.roll(centres, 1, axis=2) + corners + np.roll(corners, -1, axis=1)
        m[:, half::step, 0::step] = wibbled(down)
        step, wibble = half, wibble / decay
    m -= m.min(axis=(1, 2), keepdims=True)
    return (m / m.max(axis=(1, 2), keepdims=True)).astype(np.float32)


@_batched
def fog(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    strength, decay = [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)][severity - 1]
    x = _float(images)
    peak = x.max(axis=(1, 2, 3), keepdims=True)
    h, w = x.shape[1:3]
    side = 1 << (max(h, w) - 1).bit_length()  # the power of two the diamond-square algorithm needs, cropped
    layer = plasma_fractal(len(x), rng, side, decay)[:, :h, :w, None]
    return _uint8((x + strength * layer) * peak / (peak + strength))


@_batched
def brightness(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """HSV value + c with hue and saturation kept: each channel scales by V' / V (black becomes grey V')."""
    c = [0.05, 0.1, 0.15, 0.2, 0.3][severity - 1]
    x = _float(images)
    v = x.max(axis=3, keepdims=True)
    v_new = np.clip(v + c, 0, 1)
    return _uint8(np.where(v > 0, x * v_new / np.maximum(v, 1e-12), v_new))


@_batched
def saturate(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """HSV saturation x a + b with hue and value kept: each channel's distance below V scales by S' / S; a grey
    pixel (no hue: 0, red, as in scikit-image) gets r = V, g = b = V (1 - S')."""
    a, b = [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)][severity - 1]
    x = _float(images)
    v = x.max(axis=3, keepdims=True)
    s = np.where(v > 0, (v - x.min(axis=3, keepdims=True)) / np.maximum(v, 1e-12), 0)
    s_new = np.clip(s * a + b, 0, 1)
    coloured = v - (v - x) * s_new / np.maximum(s, 1e-12)
    grey = np.concatenate([v, v * (1 - s_new), v * (1 - s_new)], axis=3)
    return _uint8(np.where(s > 0, coloured, grey))


@_batched
def contrast(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = [0.75, 0.5, 0.4, 0.3, 0.15][severity - 1]
    x = _float(images)
    means = x.mean(axis=(1, 2), keepdims=True, dtype=np.float64).astype(np.float32)
    return _uint8((x - means) * c + means)


@_batched
def pixelate(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = [0.95, 0.9, 0.85, 0.75, 0.65][severity - 1]
    h, w = images.shape[1:3]
    small = (int(w * c), int(h * c))
    return _per_image(images, lambda im: im.resize(small, Image.Resampling.BOX).resize((w, h), Image.Resampling.BOX))


@_batched
def jpeg_compression(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    quality = [80, 65, 58, 50, 40][severity - 1]

    def jpeg(im: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        im.save(buffer, "JPEG", quality=quality)
        return Image.open(buffer)

    return _per_image(images, jpeg)


def _affine(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """N x 2 x 3 affine maps taking the three points src (3 x 2) to dst (N x 3 x 2), as OpenCV's
    getAffineTransform; points are (x, y)."""
    a = np.concatenate([src, np.ones((3, 1))], axis=1)  # 3 x 3
    return np.linalg.solve(a[None], dst).transpose(0, 2, 1)


@_batched
def elastic_transform(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A random affine warp of three points (OpenCV's warpAffine: bilinear, reflect-101 borders), then a
    smoothed random displacement field (scipy's map_coordinates, order 1, `reflect` borders)."""
    n, h, w = images.shape[:3]
    table = [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)]
    scale, smooth, shift = (f * h for f in table[severity - 1])  # fractions of the image side
    centre, third = np.array([w // 2, h // 2], float), min(h, w) // 3
    pts = np.array([centre + third, [centre[0] + third, centre[1] - third], centre - third])
    maps = _affine(pts, pts[None] + rng.uniform(-shift, shift, size=(n, 3, 2)))
    full = np.concatenate([maps, np.tile([[[0.0, 0.0, 1.0]]], (n, 1, 1))], axis=1)
    inverse = np.linalg.inv(full)[:, :2]  # output pixel -> source pixel
    yy, xx = np.meshgrid(np.arange(h, dtype=float), np.arange(w, dtype=float), indexing="ij")
    grid = np.stack([xx.ravel(), yy.ravel(), np.ones(h * w)])  # 3 x HW
    src = inverse @ grid  # N x 2 x HW
    warped = _bilinear(_float(images), src[:, 1].reshape(n, h, w), src[:, 0].reshape(n, h, w), "reflect101")
    field = rng.uniform(-1, 1, size=(2, n, h, w)).astype(np.float32)
    dx = _gaussian_filter(field[0], smooth, truncate=3, mode="symmetric") * scale
    dy = _gaussian_filter(field[1], smooth, truncate=3, mode="symmetric") * scale
    return _uint8(_bilinear(warped, yy[None] + dy, xx[None] + dx, "symmetric"))


CORRUPTIONS: dict[str, Corruption] = {
    f.__name__: f
    for f in (
        gaussian_noise,
        shot_noise,
        impulse_noise,
        speckle_noise,
        defocus_blur,
        gaussian_blur,
        motion_blur,
        zoom_blur,
        fog,
        brightness,
        contrast,
        saturate,
        pixelate,
        jpeg_compression,
        elastic_transform,
    )
}


def check_corruption(key: str, corruption, severity) -> None:
    """`<key>.corruption` one of CORRUPTIONS (a typo gets the close match), `<key>.severity` 1..5."""
    if not isinstance(corruption, str) or corruption not in CORRUPTIONS:
        close = difflib.get_close_matches(str(corruption), list(CORRUPTIONS), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(
            f"{key}.corruption={show(corruption)} is not a CIFAR-10-C corruption{hint}; available: "
            f"{', '.join(CORRUPTIONS)}."
        )
    whole_number(f"{key}.severity", severity, minimum=1, maximum=5)


def _stream_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


def corrupt_split(images: np.ndarray, corruption: str, severity: int, seed: int, split: str) -> np.ndarray:
    """The corrupted copy of a split's images (uint8 N x H x W x 3), chunk by chunk (`corrupt_chunk`)."""
    chunks = [
        corrupt_chunk(images[start : start + CHUNK], corruption, severity, seed, split, start // CHUNK)
        for start in range(0, len(images), CHUNK)
    ]
    return np.concatenate(chunks) if chunks else images.copy()


def corrupt_chunk(images: np.ndarray, corruption: str, severity: int, seed: int, split: str, chunk: int) -> np.ndarray:
    """Images CHUNK * chunk onwards of a split, with their own generator seeded from (seed, corruption, severity,
    split, chunk): the same images in every run and process. A caller may write chunks as they are made."""
    rng = np.random.default_rng(_stream_seed(seed, corruption, severity, split, chunk))
    return CORRUPTIONS[corruption](images, severity, rng)
