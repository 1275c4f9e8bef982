"""Inception-v3 in the variant FID is measured with, Flax Linen, NHWC: the 2048-d pool features.

FID (Heusel et al. 2017) uses the Inception-v3 network (Szegedy et al. 2016, "Rethinking the Inception
Architecture") of TensorFlow's graph `inception-2015-12-05`. pytorch-fid (Seitzer, github.com/mseitzer/pytorch-fid)
ported that graph to torchvision's Inception3 layout with four differences, which are the "FID" blocks here:
  - FIDInceptionA / C / E_1: the pooling branch averages over the 3x3 window without counting the zero padding
    (TensorFlow's average pooling);
  - FIDInceptionE_2 (Mixed_7c): the pooling branch uses 3x3 max pooling, stride 1, instead of average pooling;
  - the classifier has 1008 outputs (unused here: the features are the global average pool before it).
Every convolution is a BasicConv: conv (no bias) -> BatchNorm (epsilon 0.001, running statistics) -> ReLU.
Written from that published structure; module names follow torchvision's / pytorch-fid's, so the weights map
name by name (`jaxdiff.convert.inception`).

Input: images [B, H, W, 3] in [-1, 1] (jaxdiff's convention; pytorch-fid maps its [0, 1] input to this range).
With `resize_input` they are first resized to 299 x 299 by bilinear interpolation with half-pixel centres and
no antialiasing (what pytorch-fid's `F.interpolate(..., mode='bilinear', align_corners=False)` does).
Output: [B, 2048] float32, pytorch-fid's block 3 ("pool3") features.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
FEATURE_DIM = 2048


def resize_matrix(size_in, size_out):
    """[size_out, size_in] weights of 1-D bilinear interpolation, half-pixel centres (source coordinate
    (i + 0.5) size_in / size_out - 0.5, clamped to [0, size_in - 1]), two taps, no antialiasing."""
    source = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0, size_in - 1)
    below = np.floor(source).astype(int)
    above = np.minimum(below + 1, size_in - 1)
    frac = source - below
    weights = np.zeros((size_out, size_in))
    np.add.at(weights, (np.arange(size_out), below), 1 - frac)
    np.add.at(weights, (np.arange(size_out), above), frac)
    return weights


def resize_bilinear(x, size, precision=jax.lax.Precision.HIGHEST):
    """Resizes NHWC images to size x size as two matrix products (rows, then columns)."""
    if x.shape[1] == x.shape[2] == size:
        return x
    rows = jnp.asarray(resize_matrix(x.shape[1], size), x.dtype)
    cols = jnp.asarray(resize_matrix(x.shape[2], size), x.dtype)
    return jnp.einsum('oh,bhwc,pw->bopc', rows, x, cols, precision=precision)


class BasicConv(nn.Module):
    """conv (no bias) -> BatchNorm(epsilon=1e-3, running statistics) -> ReLU; padding is (rows, columns)."""
    features: int
    kernel_size: Sequence[int]
    strides: int = 1
    padding: Sequence[int] = (0, 0)
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        kernel = tuple(self.kernel_size)
        pad_rows, pad_cols = self.padding
        x = nn.Conv(self.features, kernel, strides=self.strides, use_bias=False, precision=self.precision,
                    padding=((pad_rows, pad_rows), (pad_cols, pad_cols)), name='conv')(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
        return nn.relu(x)


def _avg_pool_3x3(x):
    """3x3 average, stride 1, padding 1, zeros not counted (TensorFlow's average pooling)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x, stride, padding=0):
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((padding, padding), (padding, padding)))


class InceptionA(nn.Module):
    """Mixed_5b/c/d (FIDInceptionA): 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1; 224 + pool_features."""
    pool_features: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = lambda *args, **kw: BasicConv(*args, **kw, precision=self.precision)
        branch1x1 = conv(64, (1, 1), name='branch1x1')(x)
        branch5x5 = conv(48, (1, 1), name='branch5x5_1')(x)
        branch5x5 = conv(64, (5, 5), padding=(2, 2), name='branch5x5_2')(branch5x5)
        branch3x3dbl = conv(64, (1, 1), name='branch3x3dbl_1')(x)
        branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(branch3x3dbl)
        branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(branch3x3dbl)
        branch_pool = conv(self.pool_features, (1, 1), name='branch_pool')(_avg_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a (torchvision's InceptionB, a grid reduction): 3x3 stride 2 | 1x1 -> 3x3 -> 3x3 stride 2 | max pool."""
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = lambda *args, **kw: BasicConv(*args, **kw, precision=self.precision)
        branch3x3 = conv(384, (3, 3), strides=2, name='branch3x3')(x)
        branch3x3dbl = conv(64, (1, 1), name='branch3x3dbl_1')(x)
        branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(branch3x3dbl)
        branch3x3dbl = conv(96, (3, 3), strides=2, name='branch3x3dbl_3')(branch3x3dbl)
        return jnp.concatenate([branch3x3, branch3x3dbl, _max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b..e (FIDInceptionC): factorized 7x7 convolutions (1x7 and 7x1) with channels_7x7 inner channels."""
    channels_7x7: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = lambda *args, **kw: BasicConv(*args, **kw, precision=self.precision)
        c7 = self.channels_7x7
        branch1x1 = conv(192, (1, 1), name='branch1x1')(x)
        branch7x7 = conv(c7, (1, 1), name='branch7x7_1')(x)
        branch7x7 = conv(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(branch7x7)
        branch7x7 = conv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(branch7x7)
        branch7x7dbl = conv(c7, (1, 1), name='branch7x7dbl_1')(x)
        branch7x7dbl = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(branch7x7dbl)
        branch7x7dbl = conv(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(branch7x7dbl)
        branch7x7dbl = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(branch7x7dbl)
        branch7x7dbl = conv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(branch7x7dbl)
        branch_pool = conv(192, (1, 1), name='branch_pool')(_avg_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a (torchvision's InceptionD, a grid reduction): 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | max pool."""
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = lambda *args, **kw: BasicConv(*args, **kw, precision=self.precision)
        branch3x3 = conv(192, (1, 1), name='branch3x3_1')(x)
        branch3x3 = conv(320, (3, 3), strides=2, name='branch3x3_2')(branch3x3)
        branch7x7x3 = conv(192, (1, 1), name='branch7x7x3_1')(x)
        branch7x7x3 = conv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(branch7x7x3)
        branch7x7x3 = conv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(branch7x7x3)
        branch7x7x3 = conv(192, (3, 3), strides=2, name='branch7x7x3_4')(branch7x7x3)
        return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b (FIDInceptionE_1, pool='avg') and Mixed_7c (FIDInceptionE_2, pool='max'): expanded filter bank
    outputs (1x3 and 3x1 side by side); 320 + 768 + 768 + 192 = 2048 channels."""
    pool: str = 'avg'
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = lambda *args, **kw: BasicConv(*args, **kw, precision=self.precision)
        branch1x1 = conv(320, (1, 1), name='branch1x1')(x)
        branch3x3 = conv(384, (1, 1), name='branch3x3_1')(x)
        branch3x3 = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(branch3x3),
                                     conv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(branch3x3)], axis=-1)
        branch3x3dbl = conv(448, (1, 1), name='branch3x3dbl_1')(x)
        branch3x3dbl = conv(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(branch3x3dbl)
        branch3x3dbl = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(branch3x3dbl),
                                        conv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(branch3x3dbl)],
                                       axis=-1)
        pooled = _avg_pool_3x3(x) if self.pool == 'avg' else _max_pool_3x3(x, 1, padding=1)
        branch_pool = conv(192, (1, 1), name='branch_pool')(pooled)
        return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


class InceptionV3(nn.Module):
    """The FID Inception-v3 up to its 2048-d global average pool (pytorch-fid's InceptionV3, block 3).

    `apply({'params': ..., 'batch_stats': ...}, images [B, H, W, 3] in [-1, 1])` -> [B, 2048] float32.
    """
    resize_input: bool = True
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f'InceptionV3 expects images [B, H, W, 3], got shape {x.shape}')
        x = jnp.asarray(x, jnp.float32)
        if self.resize_input:
            x = resize_bilinear(x, INPUT_SIZE, self.precision)
        p = dict(precision=self.precision)
        x = BasicConv(32, (3, 3), strides=2, **p, name='Conv2d_1a_3x3')(x)
        x = BasicConv(32, (3, 3), **p, name='Conv2d_2a_3x3')(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), **p, name='Conv2d_2b_3x3')(x)
        x = _max_pool_3x3(x, 2)
        x = BasicConv(80, (1, 1), **p, name='Conv2d_3b_1x1')(x)
        x = BasicConv(192, (3, 3), **p, name='Conv2d_4a_3x3')(x)
        x = _max_pool_3x3(x, 2)
        x = InceptionA(32, **p, name='Mixed_5b')(x)
        x = InceptionA(64, **p, name='Mixed_5c')(x)
        x = InceptionA(64, **p, name='Mixed_5d')(x)
        x = InceptionB(**p, name='Mixed_6a')(x)
        x = InceptionC(128, **p, name='Mixed_6b')(x)
        x = InceptionC(160, **p, name='Mixed_6c')(x)
        x = InceptionC(160, **p, name='Mixed_6d')(x)
        x = InceptionC(192, **p, name='Mixed_6e')(x)
        x = InceptionD(**p, name='Mixed_7a')(x)
        x = InceptionE('avg', **p, name='Mixed_7b')(x)
        x = InceptionE('max', **p, name='Mixed_7c')(x)
        return jnp.mean(x, axis=(1, 2))


def variable_shapes(model=None):
    """{'params': ..., 'batch_stats': ...} of the model as ShapeDtypeStructs (nothing allocated or compiled)."""
    model = model or InceptionV3()
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
