"""EDM's geometric augmentation pipe as one pure, jittable JAX function applied inside the training step.

Karras et al. 2022 (EDM), App. F.2 ("non-leaky augmentations"), built on the ADA pipe of Karras et al. 2020
(App. B.1). Each transform is applied to an image with probability `multiplier * p` (EDM CIFAR-10: p = 0.12,
x-flip multiplier 1e8 so x-flips are always "enabled" and happen half the time); the network is conditioned on
the drawn parameters (`augment_labels`) and sampled with all-zero labels, which is the identity, so the
augmentations do not leak into the generated distribution.

Label layout: always `NUM_AUGMENT_LABELS` = 9 columns, in EDM's order for its CIFAR-10 settings
(xflip, yflip, scale, rotate_frac, aniso, translate_frac). Column : meaning : values
  0 xflip       : 1 if the image was mirrored left-right                           : {0, 1}
  1 yflip       : 1 if the image was mirrored top-bottom                           : {0, 1}
  2 scale       : w, isotropic scale s = 2**(w * scale_std)                       : w ~ N(0, 1) or 0
  3 rotate cos  : cos(theta) - 1, theta the rotation angle                        : [-2, 0]
  4 rotate sin  : sin(theta); theta ~ U(-pi, pi) * rotate_frac_max                : [-1, 1]
  5 aniso cos   : w * cos(r), anisotropic scale 2**(w * aniso_std) along angle r  : w ~ N(0, 1), r ~ U(-pi, pi) or 0
  6 aniso sin   : w * sin(r)
  7 translate x : t_x, shift of t_x * translate_frac_std * W pixels to the right   : t_x ~ N(0, 1) or 0
  8 translate y : t_y, shift of t_y * translate_frac_std * H pixels down           : t_y ~ N(0, 1) or 0
A transform that did not fire (or whose multiplier is 0) has label 0 = identity. Unlike EDM, whose label count
depends on which transforms are enabled, disabled transforms keep their (zero) columns, so the layout is fixed.

Sign conventions (same as EDM): images are NHWC, x to the right (W axis), y down (H axis). A positive theta
rotates the picture counter-clockwise as displayed (theta = pi/2 is `np.rot90(images, 1, axes=(1, 2))`).

Resampling (the one deliberate difference from EDM): the flips are exact pixel blits; the geometric transforms are
composed into one inverse affine matrix per image and executed by bilinear interpolation
(`jax.scipy.ndimage.map_coordinates`, order 1) with mirror padding (whole-sample symmetric: torch's 'reflect',
which EDM pads with). EDM instead upsamples 2x with a sym6 wavelet low-pass filter, samples bilinearly at 2x and
filters back down, an approximation of band-limited resampling; ours is cheaper and slightly softer/more aliased
for fractional transforms, and exact for flips, integer shifts and multiples of 90 degrees.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import ndimage

NUM_AUGMENT_LABELS = 9
LABEL_NAMES = ('xflip', 'yflip', 'scale', 'rotate_cos', 'rotate_sin', 'aniso_cos', 'aniso_sin',
               'translate_x', 'translate_y')
# The per-image parameters, each [B]; all zeros is the identity.
PARAM_NAMES = ('xflip', 'yflip', 'scale', 'rotate', 'aniso', 'aniso_angle', 'translate_x', 'translate_y')


def augment_dim():
    """The number of augmentation labels the network is conditioned on (its `augment_dim`)."""
    return NUM_AUGMENT_LABELS


def _check_images(images):
    if images.ndim != 4:
        raise ValueError(f'augment expects NHWC images [B, H, W, C], got shape {images.shape}')


def sample_params(key, batch_size, *, p, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1,
                  rotate_frac_max=1, aniso_rotate_prob=0.5):
    """Draws each image's transform parameters (EDM App. F.2 / ADA App. B.1); a transform that does not fire
    (probability 1 - multiplier * p) gets parameter 0, the identity. Returns a dict of [B] float32 arrays."""
    keys = iter(jax.random.split(key, 16))
    shape = (batch_size,)

    def fires(multiplier):
        return jax.random.uniform(next(keys), shape) < multiplier * p

    def gated(value, multiplier):
        return jnp.where(fires(multiplier), value, 0.0)

    coin = lambda: jax.random.bernoulli(next(keys), 0.5, shape).astype(jnp.float32)
    normal = lambda: jax.random.normal(next(keys), shape)
    angle = lambda limit: jax.random.uniform(next(keys), shape, minval=-limit, maxval=limit)

    params = {
        'xflip': gated(coin(), xflip),
        'yflip': gated(coin(), yflip),
        'scale': gated(normal(), scale),
        'rotate': gated(angle(math.pi * rotate_frac_max), rotate_frac),
        'aniso': gated(normal(), aniso),
    }
    # the stretch is along a random axis r with probability aniso_rotate_prob, else along x/y (r = 0); r stays 0
    # when no stretch fired, so that all-zero parameters are exactly the identity matrix
    axis_on = (jax.random.uniform(next(keys), shape) < aniso_rotate_prob) & (params['aniso'] != 0)
    params['aniso_angle'] = jnp.where(axis_on, angle(math.pi), 0.0)
    translate_on = fires(translate_frac)  # one gate for both axes, as EDM
    params['translate_x'] = jnp.where(translate_on, normal(), 0.0)
    params['translate_y'] = jnp.where(translate_on, normal(), 0.0)
    return params


def _is_static(p):
    return isinstance(p, (int, float, np.number))


def labels(params):
    """The [B, 9] conditioning labels of the parameters, in the layout of the module docstring."""
    theta, w, r = params['rotate'], params['aniso'], params['aniso_angle']
    columns = [params['xflip'], params['yflip'], params['scale'], jnp.cos(theta) - 1, jnp.sin(theta),
               w * jnp.cos(r), w * jnp.sin(r), params['translate_x'], params['translate_y']]
    return jnp.stack(columns, axis=-1).astype(jnp.float32)


def _rotation(theta):
    c, s = jnp.cos(theta), jnp.sin(theta)
    return jnp.stack([jnp.stack([c, -s], -1), jnp.stack([s, c], -1)], -2)


def _diag(sx, sy):
    zero = jnp.zeros_like(sx)
    return jnp.stack([jnp.stack([sx, zero], -1), jnp.stack([zero, sy], -1)], -2)


def inverse_affine(params, height, width, *, scale_std=0.2, aniso_std=0.2, translate_frac_std=0.125):
    """Per-image inverse map (output pixel -> input pixel), in pixel units about the image centre:
    x_in = A_inv @ x_out + b_inv. Composition as EDM/ADA: G_inv = S(1/s) R(theta) R(-r) S(1/a, a) R(r) T(-t), with
    R(phi) = [[cos, -sin], [sin, cos]]; i.e. the forward map scales by s, rotates by -theta (counter-clockwise on
    screen, y pointing down), stretches by (a, 1/a) along the axis at angle r, then translates by t.
    Returns (A_inv [B, 2, 2], b_inv [B, 2])."""
    s = jnp.exp2(params['scale'] * scale_std)
    a = jnp.exp2(params['aniso'] * aniso_std)
    r = params['aniso_angle']
    linear = (_diag(1 / s, 1 / s) @ _rotation(params['rotate'])
              @ _rotation(-r) @ _diag(1 / a, a) @ _rotation(r))
    shift = jnp.stack([params['translate_x'] * (width * translate_frac_std),
                       params['translate_y'] * (height * translate_frac_std)], -1)
    return linear, -(linear @ shift[..., None])[..., 0]


def _warp(image, linear, offset):
    """Bilinear resampling of one image [H, W, C] at x_in = linear @ x_out + offset (centred pixel coords)."""
    height, width = image.shape[:2]
    cy, cx = (height - 1) / 2, (width - 1) / 2
    y, x = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32) - cy, jnp.arange(width, dtype=jnp.float32) - cx,
                        indexing='ij')
    x_in = linear[0, 0] * x + linear[0, 1] * y + offset[0] + cx
    y_in = linear[1, 0] * x + linear[1, 1] * y + offset[1] + cy
    warp_channel = lambda channel: ndimage.map_coordinates(channel, [y_in, x_in], order=1, mode='mirror')
    return jax.vmap(warp_channel, in_axes=-1, out_axes=-1)(image)


def transform(images, params, *, scale_std=0.2, aniso_std=0.2, translate_frac_std=0.125):
    """Applies given per-image parameters (a dict as from `sample_params`) to NHWC images: flips as exact pixel
    blits first (as EDM), then the geometric transforms as one affine resampling."""
    _check_images(images)
    images = jnp.asarray(images)
    flip = lambda flag, flipped, x: jnp.where(flag[:, None, None, None] > 0.5, flipped, x)
    images = flip(params['xflip'], images[:, :, ::-1], images)
    images = flip(params['yflip'], images[:, ::-1], images)
    linear, offset = inverse_affine(params, images.shape[1], images.shape[2], scale_std=scale_std,
                                    aniso_std=aniso_std, translate_frac_std=translate_frac_std)
    warped = jax.vmap(_warp)(images, linear, offset)
    return warped.astype(images.dtype)


def augment(key, images, *, p, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1,
            scale_std=0.2, rotate_frac_max=1, aniso_std=0.2, aniso_rotate_prob=0.5, translate_frac_std=0.125):
    """EDM's augmentation pipe (defaults: its CIFAR-10 settings; pass p=0.12). images: NHWC [B, H, W, C].

    Returns (images_aug [B, H, W, C], augment_labels [B, 9]). With p = 0 (a Python number) it returns the
    images unchanged and all-zero labels without resampling.
    """
    _check_images(images)
    batch_size = images.shape[0]
    if _is_static(p) and p < 0:
        raise ValueError(f'augmentation probability data.augment_p must be >= 0, got {p}')
    if _is_static(p) and p == 0:
        return jnp.asarray(images), jnp.zeros((batch_size, NUM_AUGMENT_LABELS), jnp.float32)
    params = sample_params(key, batch_size, p=p, xflip=xflip, yflip=yflip, scale=scale, rotate_frac=rotate_frac,
                           aniso=aniso, translate_frac=translate_frac, rotate_frac_max=rotate_frac_max,
                           aniso_rotate_prob=aniso_rotate_prob)
    images_aug = transform(images, params, scale_std=scale_std, aniso_std=aniso_std,
                           translate_frac_std=translate_frac_std)
    return images_aug, labels(params)
