"""Building blocks of EDM's SongUNet in Flax Linen, NHWC.

Follows the layer definitions of Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models" (EDM), App. F.2 / Table 7 (its `networks.py` describes them), which re-implement the DDPM++ / NCSN++
blocks of Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential Equations"
(score_sde). Written from the paper's description; no code copied.

Precision: parameters are always float32 (`param_dtype`); `dtype` is the compute dtype that inputs and weights
are cast to. GroupNorm statistics and attention softmax are computed in float32 whatever `dtype` is.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def edm_init(init_mode='xavier_uniform', init_weight=1.0):
    """EDM's `weight_init(mode, fan_in, fan_out) * init_weight` as a Flax initializer.

    xavier_uniform: U(-a, a), a = init_weight * sqrt(6 / (fan_in + fan_out)); xavier_normal: std init_weight *
    sqrt(2 / (fan_in + fan_out)); kaiming_uniform: a = init_weight * sqrt(3 / fan_in); kaiming_normal: std
    init_weight * sqrt(1 / fan_in). Fans count the receptive field (k*k*C), as EDM does; kernels are [..., in, out].
    """
    modes = {
        'xavier_uniform': ('fan_avg', 'uniform'),
        'xavier_normal': ('fan_avg', 'normal'),
        'kaiming_uniform': ('fan_in', 'uniform'),
        'kaiming_normal': ('fan_in', 'normal'),
    }
    if init_mode not in modes:
        raise ValueError(f'unknown init_mode {init_mode!r}; valid: {", ".join(sorted(modes))}')
    fan, distribution = modes[init_mode]
    # variance_scaling(scale) has variance scale / fan; EDM's formulas above are that with scale = init_weight^2.
    return jax.nn.initializers.variance_scaling(init_weight ** 2, fan, distribution)


# EDM's three initializations inside SongUNet: default, near-zero (last conv of each residual branch and the
# output conv, init_weight=1e-5, so every block starts close to the identity) and attention qkv (sqrt(0.2)).
INIT = dict(init_mode='xavier_uniform', init_weight=1.0)
INIT_ZERO = dict(init_mode='xavier_uniform', init_weight=1e-5)
INIT_ATTN = dict(init_mode='xavier_uniform', init_weight=float(np.sqrt(0.2)))


def Dense(features, use_bias=True, init_mode='xavier_uniform', init_weight=1.0, dtype=jnp.float32, name=None):
    """EDM's Linear: y = x W + b with W ~ edm_init(init_mode, init_weight), b = 0; float32 params."""
    return nn.Dense(features, use_bias=use_bias, kernel_init=edm_init(init_mode, init_weight),
                    bias_init=nn.initializers.zeros, dtype=dtype, param_dtype=jnp.float32, name=name)


def _resample_taps(resample_filter):
    """The separable 2-D FIR filter f f^T / (sum f)^2 of EDM's Conv2d (score_sde's FIR up/down-sampling)."""
    f = np.asarray(resample_filter, dtype=np.float32)
    return np.outer(f, f) / np.square(f.sum())


def _depthwise(x, taps, stride, padding, lhs_dilation=1):
    """Applies the same [k, k] filter to every channel of NHWC `x` (grouped convolution, one group per channel)."""
    channels = x.shape[-1]
    kernel = jnp.tile(jnp.asarray(taps, x.dtype)[:, :, None, None], (1, 1, 1, channels))
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride), padding=[(padding, padding)] * 2,
        lhs_dilation=(lhs_dilation, lhs_dilation), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=channels)


def upsample(x, resample_filter):
    """2x FIR upsampling = EDM's conv_transpose2d(x, 4 f f^T, stride 2, padding (len(f)-1)//2), per channel."""
    taps = _resample_taps(resample_filter) * 4
    k = taps.shape[0]
    f_pad = (k - 1) // 2
    # A stride-2 transposed conv with padding p is a conv of the 2x-dilated input with the flipped kernel and
    # padding k-1-p; the filters here are symmetric, flipping is kept for correctness with any filter.
    return _depthwise(x, taps[::-1, ::-1], stride=1, padding=k - 1 - f_pad, lhs_dilation=2)


def downsample(x, resample_filter, padding=None):
    """2x FIR downsampling = EDM's conv2d(x, f f^T, stride 2, padding (len(f)-1)//2), per channel."""
    taps = _resample_taps(resample_filter)
    f_pad = (taps.shape[0] - 1) // 2 if padding is None else padding
    return _depthwise(x, taps, stride=2, padding=f_pad)


class Conv2d(nn.Module):
    """EDM's Conv2d: optional 2x FIR up/down-sampling, then a k x k 'same' convolution (k=0: resampling only).

    `fused_resample=True` swaps the order to conv-then-downsample (or upsample-then-conv) with the paddings EDM
    uses for its fused path; the NCSN++ residual encoder (`aux_residual`) relies on it.
    """
    features: int
    kernel: int
    use_bias: bool = True
    up: bool = False
    down: bool = False
    resample_filter: Sequence[int] = (1, 1)
    fused_resample: bool = False
    init_mode: str = 'xavier_uniform'
    init_weight: float = 1.0
    dtype: Dtype = jnp.float32

    def _conv(self, x, padding):
        w = self.param('kernel', edm_init(self.init_mode, self.init_weight),
                       (self.kernel, self.kernel, x.shape[-1], self.features), jnp.float32)
        return jax.lax.conv_general_dilated(
            x, w.astype(self.dtype), window_strides=(1, 1), padding=[(padding, padding)] * 2,
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

    @nn.compact
    def __call__(self, x):
        assert not (self.up and self.down), 'Conv2d: up and down are exclusive'
        x = x.astype(self.dtype)
        w_pad = self.kernel // 2
        f_pad = (len(self.resample_filter) - 1) // 2
        if self.kernel and self.fused_resample and self.up:
            x = upsample(x, self.resample_filter)
            x = self._conv(x, w_pad)
        elif self.kernel and self.fused_resample and self.down:
            x = self._conv(x, w_pad + f_pad)
            x = downsample(x, self.resample_filter, padding=0)
        else:
            if self.up:
                x = upsample(x, self.resample_filter)
            if self.down:
                x = downsample(x, self.resample_filter)
            if self.kernel:
                x = self._conv(x, w_pad)
        if self.kernel and self.use_bias:
            x = x + self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        return x


class GroupNorm(nn.Module):
    """EDM's GroupNorm: min(32, C // 4) groups, statistics in float32, learned per-channel scale and bias."""
    num_groups: int = 32
    min_channels_per_group: int = 4
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        groups = min(self.num_groups, channels // self.min_channels_per_group)
        scale = self.param('scale', nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param('bias', nn.initializers.zeros, (channels,), jnp.float32)
        x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], groups, channels // groups)
        axes = tuple(range(1, x32.ndim - 2)) + (x32.ndim - 1,)  # spatial dims and channels within a group
        mean = x32.mean(axis=axes, keepdims=True)
        var = jnp.square(x32 - mean).mean(axis=axes, keepdims=True)
        x32 = ((x32 - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        return (x32 * scale + bias).astype(self.dtype)


def positional_embedding(noise_labels, num_channels, max_positions=10000, endpoint=True):
    """Transformer sinusoidal embedding of c_noise (DDPM++; EDM's PositionalEmbedding with endpoint=True).

    Frequencies (1/max_positions)^(i / (num_channels/2 - endpoint)), i < num_channels/2; returns [sin, cos]
    (EDM computes [cos, sin] and then swaps the halves; the result is this order).
    """
    half = num_channels // 2
    freqs = jnp.arange(half, dtype=jnp.float32) / (half - (1 if endpoint else 0))
    freqs = (1.0 / max_positions) ** freqs
    angles = noise_labels.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def fourier_embedding(noise_labels, num_channels, scale=16.0, seed=0):
    """Random Fourier features of c_noise (NCSN++; Tancik et al. 2020 as used by score_sde and EDM, scale 16).

    The frequencies f ~ N(0, scale^2) are a fixed buffer in EDM, not trained; here they are a constant drawn from a
    fixed key, so they need no variable collection and never enter the trainable parameter count. Returns
    [sin(2 pi f c), cos(2 pi f c)] (EDM's [cos, sin] after its half swap).
    """
    freqs = jax.random.normal(jax.random.key(seed), (num_channels // 2,), jnp.float32) * scale
    angles = noise_labels.astype(jnp.float32)[:, None] * (2 * np.pi * freqs)[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class UNetBlock(nn.Module):
    """EDM's UNetBlock as configured by SongUNet (score_sde's ResnetBlockBigGAN + optional self-attention).

    x -> conv0(silu(norm0(x))) [with 2x up/down] -> + affine(emb) -> silu(norm1) -> dropout -> conv1 (near-zero init)
    -> + skip(x) -> * skip_scale; then, with attention, x + proj(attn(norm2(x))) (proj near-zero init) -> * skip_scale.
    The skip is a 1x1 conv (with resampling) whenever channels change or the block resamples (resample_proj=True).
    """
    features: int
    up: bool = False
    down: bool = False
    attention: bool = False
    num_heads: int = 1
    dropout: float = 0.0
    skip_scale: float = float(np.sqrt(0.5))
    epsilon: float = 1e-6
    resample_filter: Sequence[int] = (1, 1)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, emb, train=False):
        orig = x
        conv = dict(resample_filter=self.resample_filter, dtype=self.dtype)
        h = nn.silu(GroupNorm(epsilon=self.epsilon, dtype=self.dtype, name='norm0')(x))
        h = Conv2d(self.features, 3, up=self.up, down=self.down, **conv, **INIT, name='conv0')(h)
        params = Dense(self.features, **INIT, dtype=self.dtype, name='affine')(emb)
        h = nn.silu(GroupNorm(epsilon=self.epsilon, dtype=self.dtype, name='norm1')(h + params[:, None, None, :]))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = Conv2d(self.features, 3, **conv, **INIT_ZERO, name='conv1')(h)
        if self.features != x.shape[-1] or self.up or self.down:
            orig = Conv2d(self.features, 1, up=self.up, down=self.down, **conv, **INIT, name='skip')(orig)
        x = (h + orig.astype(h.dtype)) * self.skip_scale
        if self.attention:
            x = (x + self._attention(x)) * self.skip_scale
        return x

    def _attention(self, x):
        """Multi-head self-attention over the H*W positions; logits and softmax in float32."""
        batch, height, width, channels = x.shape
        heads = self.num_heads
        qkv = Conv2d(channels * 3, 1, dtype=self.dtype, **INIT_ATTN, name='qkv')(
            GroupNorm(epsilon=self.epsilon, dtype=self.dtype, name='norm2')(x))
        # Channel layout [head, channel, (q, k, v)], as in EDM, so converted EDM weights would load unchanged.
        qkv = qkv.reshape(batch, height * width, heads, channels // heads, 3)
        q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
        logits = jnp.einsum('bqhc,bkhc->bhqk', q.astype(jnp.float32), k.astype(jnp.float32))
        w = jax.nn.softmax(logits / np.sqrt(channels // heads), axis=-1)
        a = jnp.einsum('bhqk,bkhc->bqhc', w.astype(self.dtype), v).reshape(batch, height, width, channels)
        return Conv2d(channels, 1, dtype=self.dtype, **INIT_ZERO, name='proj')(a)
