"""Pictures of samples: grids of images (NHWC in [-1, 1]) and scatter plots of 2-D points, as uint8 arrays
(`picture`, for TensorBoard) or PNG files (`save_png`), and .npz files."""
import math
import os

import numpy as np
from PIL import Image, ImageDraw


def to_uint8(images):
    """[-1, 1] floats -> uint8 pixels, rounding as EDM's generate.py does: x * 127.5 + 128, clipped."""
    return np.clip(np.asarray(images, np.float32) * 127.5 + 128, 0, 255).astype(np.uint8)


def grid(images, columns=None, padding=1):
    """Tiles images [N, H, W, C] into one uint8 image, `padding` grey pixels between tiles."""
    pixels = to_uint8(images)
    n, h, w, c = pixels.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    step_h, step_w = h + padding, w + padding
    canvas = np.full((rows * step_h + padding, columns * step_w + padding, c), 128, np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        top, left = padding + r * step_h, padding + col * step_w
        canvas[top:top + h, left:left + w] = pixels[i]
    return canvas


def grid_picture(images, *, columns=None, min_size=256):
    """Images [N, H, W, C] as one uint8 grid [H', W', C], upscaled (nearest) to >= `min_size` pixels."""
    canvas = grid(images, columns)
    scale = max(1, math.ceil(min_size / max(canvas.shape[:2])))
    return np.repeat(np.repeat(canvas, scale, axis=0), scale, axis=1)


def points_picture(points, *, size=384, extent=None):
    """A scatter plot of 2-D points [N, 2] as a uint8 RGB array [size, size, 3];
    `extent` (half-width of the square shown) defaults to the data's."""
    points = np.asarray(points, np.float64)
    extent = extent or max(1e-6, float(np.nanmax(np.abs(points)))) * 1.05
    pixels = (points / extent * 0.5 + 0.5) * (size - 1)
    image = Image.new('RGB', (size, size), 'white')
    draw = ImageDraw.Draw(image)
    for x, y in pixels[np.all(np.isfinite(pixels), axis=1)]:
        draw.ellipse((x - 1.5, size - 1 - y - 1.5, x + 1.5, size - 1 - y + 1.5), fill=(31, 119, 180))
    return np.asarray(image)


def picture(samples):
    """Samples as one uint8 picture [H, W, C]: a grid for images [N, H, W, C], a scatter plot for points [N, 2]
    (what `save_png` writes, and what `Logger.image` sends to TensorBoard)."""
    samples = np.asarray(samples)
    if samples.ndim == 2 and samples.shape[1] == 2:
        return points_picture(samples)
    if samples.ndim == 4:
        return grid_picture(samples)
    raise ValueError(f'cannot draw samples of shape {samples.shape}: expected images [N, H, W, C] or points [N, 2]')


def save_picture(path, pixels):
    """Writes a uint8 picture [H, W, C] (C = 1, 3 or 4) or [H, W] as a PNG."""
    pixels = np.asarray(pixels, np.uint8)
    _makedirs_for(path)
    Image.fromarray(pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels).save(path)
    return path


def save_png(path, samples):
    """A PNG of samples: a grid for images [N, H, W, C], a scatter plot for points [N, 2]."""
    return save_picture(path, picture(samples))


def save_npz(path, **arrays):
    _makedirs_for(path)
    np.savez(path, **{name: np.asarray(value) for name, value in arrays.items()})
    return path


def _makedirs_for(path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
