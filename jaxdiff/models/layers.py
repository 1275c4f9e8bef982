"""Building blocks of EDM's SongUNet in Flax Linen, NHWC.

Follows the layer definitions of Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models" (EDM), App. F.2 / Table 7 (its `networks.py` describes them), which re-implement the DDPM++ / NCSN++
blocks of Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential Equations"
(score_sde). Written from the paper's description; no code copied.

Precision: parameters are always float32 (`param_dtype`); `dtype` is the compute dtype that inputs and weights
are cast to. GroupNorm statistics and attention softmax are computed in float32 whatever `dtype` is.

Speed (same outputs to float32 round-off): FIR resampling is written as strided slices and sums (the [1, 1] filter
is exactly a 2x2 mean and a nearest 2x repeat), GroupNorm has a two-pass backward (`group_norm`), 1x1 convolutions
are matmuls, and 3x3 convolutions run either as XLA's convolution or as Winograd F(2x2, 3x3) batched matmuls
(`conv_algorithm`, `winograd.py`).
"""
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models import winograd

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


def _fir_taps(resample_filter):
    """The 1-D factor f / sum(f) of EDM's separable 2-D FIR filter f f^T / (sum f)^2 (score_sde's resampling)."""
    f = np.asarray(resample_filter, dtype=np.float64)
    return f / f.sum()


def _weighted_sum(coefficients, terms):
    """sum_k c_k t_k over the non-zero c_k (Python floats: the zeros of a filter cost nothing)."""
    total = None
    for c, t in zip(coefficients, terms):
        if c == 0:
            continue
        term = t if c == 1 else t * np.asarray(c, t.dtype)
        total = term if total is None else total + term
    return total


def _pairs(x, axis):
    """x [..., 2 n, ...] -> [..., n, 2, ...]: each even / odd pair along `axis` gets its own axis (a free reshape)."""
    return x.reshape(*x.shape[:axis], x.shape[axis] // 2, 2, *x.shape[axis + 1:])


def _down_axis(x, f, padding, axis):
    """y[o] = sum_k f[k] x_pad[2 o + k] along `axis` (a stride-2 correlation), as len(f) strided slices; a 2-tap
    filter without padding on an even axis is a weighted sum of each pair (a reshape and a reduction)."""
    if len(f) == 2 and padding == 0 and x.shape[axis] % 2 == 0:
        pairs = _pairs(x, axis)
        weights = jnp.asarray(f, x.dtype).reshape((2,) + (1,) * (x.ndim - axis - 1))
        return (pairs * weights).sum(axis=axis + 1)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (padding, padding)
    x = jnp.pad(x, pad)
    n_out = (x.shape[axis] - len(f)) // 2 + 1
    taps = [jax.lax.slice_in_dim(x, k, k + 2 * (n_out - 1) + 1, stride=2, axis=axis) for k in range(len(f))]
    return _weighted_sum(f, taps)


def _up_axis(x, g, padding, axis):
    """EDM's stride-2 transposed convolution with kernel g and padding p along `axis`, in polyphase form.

    y[o] = sum_{i, k: 2 i + k - p = o} g[k] x[i]; output o = 2 j + r reads x[j + (r + p - k) / 2] for the taps k
    with r + p - k even, so each phase r is a sum of shifted copies of x, and the two phases interleave."""
    n, K = x.shape[axis], len(g)
    n_out = 2 * (n - 1) + K - 2 * padding
    if K == 2 and padding == 0:   # y[2 j + r] = g[r] x[j]: each entry repeated with the weights g (a broadcast)
        weights = jnp.asarray(g, x.dtype).reshape((2,) + (1,) * (x.ndim - axis - 1))
        y = jnp.expand_dims(x, axis + 1) * weights if np.any(g != 1) else \
            jnp.broadcast_to(jnp.expand_dims(x, axis + 1), (*x.shape[:axis + 1], 2, *x.shape[axis + 1:]))
        return y.reshape(*x.shape[:axis], 2 * n, *x.shape[axis + 1:])
    phases = []
    for r in range(2):
        j_count = (n_out - r + 1) // 2
        taps = [(k, (r + padding - k) // 2) for k in range(K) if (r + padding - k) % 2 == 0]
        lo = max(0, -min(shift for _, shift in taps))
        hi = max(0, max(shift for _, shift in taps) + j_count - n)
        pad = [(0, 0)] * x.ndim
        pad[axis] = (lo, hi)
        xp = jnp.pad(x, pad)
        terms = [jax.lax.slice_in_dim(xp, lo + shift, lo + shift + j_count, axis=axis) for _, shift in taps]
        phases.append(_weighted_sum([g[k] for k, _ in taps], terms))
    if phases[1].shape[axis] < phases[0].shape[axis]:   # odd output length: the last odd phase entry is missing
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, 1)
        phases[1] = jnp.pad(phases[1], pad)
    y = jnp.stack(phases, axis=axis + 1)
    y = y.reshape(*x.shape[:axis], 2 * phases[0].shape[axis], *x.shape[axis + 1:])
    return jax.lax.slice_in_dim(y, 0, n_out, axis=axis)


def upsample(x, resample_filter):
    """2x FIR upsampling = EDM's conv_transpose2d(x, 4 f f^T / (sum f)^2, stride 2, padding (len(f)-1)//2), per
    channel, NHWC; separable, so each axis gets the 1-D kernel 2 f / sum(f) ([1, 1]: a nearest 2x repeat)."""
    g = 2 * _fir_taps(resample_filter)
    padding = (len(g) - 1) // 2
    return _up_axis(_up_axis(x, g, padding, axis=1), g, padding, axis=2)


def downsample(x, resample_filter, padding=None):
    """2x FIR downsampling = EDM's conv2d(x, f f^T / (sum f)^2, stride 2, padding (len(f)-1)//2), per channel,
    NHWC; separable, each axis filtered by f / sum(f) with stride 2 ([1, 1]: a 2x2 mean)."""
    f = _fir_taps(resample_filter)
    padding = (len(f) - 1) // 2 if padding is None else padding
    return _down_axis(_down_axis(x, f, padding, axis=1), f, padding, axis=2)


CONV_ALGORITHMS = ('auto', 'xla', 'winograd')
# 'auto' by backend for float32 convolutions, as measured in benchmarks/RESULTS.md ("conv_algorithm"): on XLA:CPU
# Winograd is faster forward and much faster backward (XLA:CPU's weight-gradient convolution is slow at 32x32);
# elsewhere (cuDNN, TPU) XLA's convolution. Other dtypes (bf16) always use XLA's convolution, whose accumulation
# is float32: Winograd's transforms in bf16 would add rounding.
AUTO_CONV_ALGORITHM = {'cpu': 'winograd'}


def resolve_conv_algorithm(conv_algorithm, dtype=jnp.float32):
    """'xla' or 'winograd' for `conv_algorithm` ('auto': AUTO_CONV_ALGORITHM of the default backend)."""
    if conv_algorithm not in CONV_ALGORITHMS:
        raise ValueError(f'model.conv_algorithm={conv_algorithm!r}; valid: {", ".join(CONV_ALGORITHMS)}')
    if conv_algorithm == 'auto':
        if jnp.dtype(dtype) != jnp.float32:
            return 'xla'
        return AUTO_CONV_ALGORITHM.get(jax.default_backend(), 'xla')
    return conv_algorithm


def conv2d(x, w, padding, conv_algorithm='xla'):
    """Stride-1 'same'-style convolution of NHWC x with an HWIO kernel, zero padding `padding` on each side.

    1x1 kernels are a matmul over channels; 3x3 kernels go to Winograd F(2x2, 3x3) when conv_algorithm resolves to
    'winograd' and both channel counts reach winograd.MIN_CHANNELS (the transforms dominate below); every other
    case is XLA's convolution."""
    kh, kw, cin, cout = w.shape
    if kh == kw == 1 and padding == 0:
        return jnp.einsum('bhwc,co->bhwo', x, w[0, 0])
    if (kh, kw) == (3, 3) and resolve_conv_algorithm(conv_algorithm, x.dtype) == 'winograd' \
            and min(cin, cout) >= winograd.MIN_CHANNELS:
        return winograd.conv3x3(x, w, padding)
    return jax.lax.conv_general_dilated(x, w, window_strides=(1, 1), padding=[(padding, padding)] * 2,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


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
    conv_algorithm: str = 'auto'
    dtype: Dtype = jnp.float32

    def _conv(self, x, padding):
        w = self.param('kernel', edm_init(self.init_mode, self.init_weight),
                       (self.kernel, self.kernel, x.shape[-1], self.features), jnp.float32)
        return conv2d(x, w.astype(self.dtype), padding, self.conv_algorithm)

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


def _group_statistics(x, groups):
    """Per (example, group) mean and variance (two-pass: the mean first) of NHWC x over H, W and the group's channels."""
    batch, channels = x.shape[0], x.shape[-1]
    grouped = x.reshape(batch, -1, groups, channels // groups)
    mean = grouped.mean(axis=(1, 3))
    var = jnp.square(grouped - mean[:, None, :, None]).mean(axis=(1, 3))
    return mean, var


def _per_channel(v, channels):
    """[B, G] -> [B, 1, 1, C]: each group's value repeated over its channels (broadcast against NHWC)."""
    return jnp.repeat(v, channels // v.shape[1], axis=1)[:, None, None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _group_norm(x, scale, bias, epsilon, groups):
    return _group_norm_fwd(x, scale, bias, epsilon, groups)[0]


def _group_norm_fwd(x, scale, bias, epsilon, groups):
    mean, var = _group_statistics(x, groups)
    r = jax.lax.rsqrt(var + epsilon)
    x_hat = (x - _per_channel(mean, x.shape[-1])) * _per_channel(r, x.shape[-1])
    return x_hat * scale + bias, (x, mean, r, scale)


def _group_norm_bwd(epsilon, groups, residuals, dy):
    """dx = r (g - mean_G(g) - x_hat mean_G(g x_hat)), g = dy * scale; dscale = sum dy x_hat; dbias = sum dy.

    Per-(example, channel) sums of dy and dy x_hat (one pass over dy and x) give all the group means, then one
    elementwise pass gives dx: two passes instead of the several that autodiff of the forward formula takes."""
    x, mean, r, scale = residuals
    channels = x.shape[-1]
    x_hat = (x - _per_channel(mean, channels)) * _per_channel(r, channels)
    sum_dy = dy.sum(axis=(1, 2))                                    # [B, C]
    sum_dy_x_hat = (dy * x_hat).sum(axis=(1, 2))
    count = x[0].size // groups                                     # elements per group
    group_mean = lambda v: (v * scale).reshape(v.shape[0], groups, channels // groups).sum(-1) / count
    dx = _per_channel(r, channels) * (dy * scale - _per_channel(group_mean(sum_dy), channels)
                                      - x_hat * _per_channel(group_mean(sum_dy_x_hat), channels))
    return dx, sum_dy_x_hat.sum(0), sum_dy.sum(0)


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def group_norm(x, scale, bias, groups, epsilon=1e-6):
    """GroupNorm of NHWC x in float32 (Wu & He 2018): (x - mean) / sqrt(var + epsilon) * scale + bias, statistics
    per example over H, W and each group's channels (biased variance, as torch.nn.functional.group_norm)."""
    x = x.astype(jnp.float32)
    return _group_norm(x, scale.astype(jnp.float32), bias.astype(jnp.float32), float(epsilon), int(groups))


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
        return group_norm(x, scale, bias, groups, self.epsilon).astype(self.dtype)


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


def fourier_embedding(noise_labels, freqs):
    """Random Fourier features of c_noise (NCSN++; Tancik et al. 2020 as used by score_sde and EDM):
    [sin(2 pi f c), cos(2 pi f c)] for the frequencies `freqs` [num_channels / 2] (EDM's [cos, sin] after its half
    swap)."""
    angles = noise_labels.astype(jnp.float32)[:, None] * (2 * np.pi * freqs.astype(jnp.float32))[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class FourierEmbedding(nn.Module):
    """EDM's FourierEmbedding: frequencies f ~ N(0, scale^2) drawn once at init (scale 16) and kept, untrained, in
    the 'buffers' collection as 'freqs' (EDM's `map_noise.freqs` buffer), so a network carries its own draw."""
    num_channels: int
    scale: float = 16.0

    @nn.compact
    def __call__(self, noise_labels):
        freqs = self.variable('buffers', 'freqs', lambda: jax.random.normal(
            self.make_rng('params'), (self.num_channels // 2,), jnp.float32) * self.scale)
        return fourier_embedding(noise_labels, freqs.value)


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
    conv_algorithm: str = 'auto'
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, emb, train=False):
        orig = x
        conv = dict(resample_filter=self.resample_filter, conv_algorithm=self.conv_algorithm, dtype=self.dtype)
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
