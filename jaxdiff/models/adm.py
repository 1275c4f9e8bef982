"""ADM: the UNet and the classifier encoder of Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs on Image
Synthesis", github.com/openai/guided-diffusion, `guided_diffusion/unet.py` and `nn.py`), in Flax Linen, NHWC.

Written from the authors' description and code (names, layouts and formulas; no code copied) so that their released
checkpoints load one to one (`jaxdiff/convert/adm.py`):

  timestep_embedding  [cos(t f_i), sin(t f_i)], f_i = max_period^(-i / half), i < half = dim // 2 (a zero column
                      appended for odd dim); the network embeds c_noise this way with dim = model_channels, then
                      Linear(4 model_channels) -> SiLU -> Linear(4 model_channels) (`time_embed`).
  GroupNorm32         32 groups, epsilon 1e-5 (torch's default), statistics in float32.
  ResBlock            h = conv3x3(SiLU(GN(x))) (with `resblock_updown`: GN and SiLU, then x and h are both resampled,
                      nearest 2x up or 2x2 average down, then the conv); e = Linear(SiLU(emb));
                      scale-shift norm: h = GN(h) * (1 + scale) + shift with (scale, shift) = e split in halves,
                      else GN(h + e); then SiLU -> dropout -> zero-initialised conv3x3; output skip(x) + h with skip
                      the identity or a 1x1 conv when the channel count changes.
  AttentionBlock      x + proj_out(attention(qkv(GN(x)))) over the H*W tokens, proj_out zero-initialised; q and k
                      are each scaled by ch^(-1/4) before their product (ch = channels per head), softmax in float32.
                      The qkv projection's 3C output channels are read per head first ([head, (q, k, v), ch]:
                      QKVAttentionLegacy, the default) or per q / k / v first ([(q, k, v), head, ch]: QKVAttention,
                      `use_new_attention_order`); the output channels are [head, ch] in both.
  Downsample/Upsample conv3x3 with stride 2 and padding 1 (or 2x2 average pooling without `conv_resample`) /
                      nearest 2x then conv3x3 (or no conv).
  UNet                input conv, per level num_res_blocks ResBlocks (+ attention at the downsample rates in
                      `attention_resolutions`), a down block between levels; middle ResBlock, attention, ResBlock;
                      per level num_res_blocks + 1 ResBlocks on [h, skip] concatenations (+ attention), an up block
                      after the last one of every level but the top; output GN -> SiLU -> zero conv3x3.
  EncoderUNet         the UNet's encoder and middle block, then a head (`pool`): 'adaptive' (GN, SiLU, global mean,
                      zero 1x1 conv), 'attention' (GN, SiLU, AttentionPool2d: the token mean prepended to the H*W
                      tokens, a learned positional embedding added, multi-head attention with QKVAttention's split and
                      num_head_channels channels per head, the output of the mean token projected by c_proj),
                      'spatial' (the spatial means of every encoder block and of the middle block concatenated,
                      Linear(2048) -> ReLU -> Linear) or 'spatial_v2' (Linear(2048) -> GN32 -> SiLU -> Linear).

Differences from the authors' modules, none of which changes an output:
  - NHWC activations (the authors' are NCHW); conv kernels are HWIO, Linear and 1-D conv kernels [in, out]; the
    AttentionPool2d positional embedding is [H*W + 1, C] (theirs [C, H*W + 1]).
  - Class labels come as jaxdiff's one-hot rows [B, label_dim] (the authors' `y` is an integer [B]): the embedding is
    the one-hot row times the embedding table, equal to the table lookup for one-hot rows; an all-zero row (or
    class_labels=None) adds nothing (jaxdiff's "no label", classifier-free guidance's null label).
  - `out_channels` is the image's channel count; with `learn_sigma` the UNet returns 2 * out_channels channels
    (the authors' out_channels=6 for RGB): the first out_channels are the mean part (epsilon) that jaxdiff uses
    (`jaxdiff.core.iddpm`), the rest the variance interpolation.
  - Flax module names mirror the authors' state dict names: `input_blocks.4.0.in_layers.2.weight` is
    params['input_blocks_4_0']['in_layers_2']['kernel'] (see convert/adm.py).
  - Parameters are float32; `dtype` is the compute dtype (GroupNorm statistics and the softmax stay float32);
    `precision` is passed to every matmul and convolution (None: the backend default).
  - Initialisation: kernels U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's default), biases zero, embeddings N(0, 1),
    the authors' zero modules zero.

Both networks sow their middle-block output (float32, [B, H / 2^(L-1), W / 2^(L-1), C]) as
('intermediates', 'bottleneck'): for the classifier that is the feature map the discriminator guidance authors read
from ADM's 32x32 classifier ([B, 8, 8, 512]).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.layers import group_norm

Dtype = Any
POOLS = ('adaptive', 'attention', 'spatial', 'spatial_v2')
GROUPS = 32                 # GroupNorm32: normalization(channels) = GroupNorm(32, channels)
EPSILON = 1e-5              # torch.nn.GroupNorm's default eps

# torch.nn.Linear / Conv's default initialisation U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (variance 1 / (3 fan_in)).
TORCH_INIT = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


# ---------------------------------------------------------------------------------------------- functions

def timestep_embedding(timesteps, dim, max_period=10000):
    """ADM's sinusoidal embedding (guided_diffusion/nn.py `timestep_embedding`): [cos(t f), sin(t f)] with
    f_i = exp(-ln(max_period) i / half), i = 0 .. half - 1, half = dim // 2; a zero column is appended for odd dim.
    timesteps [B] (fractional allowed) -> [B, dim] float32."""
    half = dim // 2
    # Host constants: the exponent formed in float32 as the authors' code forms it (-ln(max_period) * i, then / half),
    # its exp rounded once from float64, so that every backend gets the same float32 frequencies. (torch's float32
    # exp differs from the correctly rounded value by 1 ulp for a few i; at t ~ 1000 that moves the embedding by
    # ~3e-5.)
    exponent = np.float32(-np.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = jnp.asarray(np.exp(exponent.astype(np.float64)).astype(np.float32))
    args = jnp.asarray(timesteps, jnp.float32).reshape(-1)[:, None] * freqs[None]
    embedding = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        embedding = jnp.concatenate([embedding, jnp.zeros_like(embedding[:, :1])], axis=-1)
    return embedding


def qkv_attention(qkv, num_heads, new_order=False, precision=None):
    """Multi-head attention of ADM's QKVAttentionLegacy (new_order=False) or QKVAttention (new_order=True).

    qkv [B, T, 3 H ch] (channels last): the legacy split reads the channels as [H, (q, k, v), ch], the new one as
    [(q, k, v), H, ch]. weights = softmax_s((q_t ch^(-1/4)) . (k_s ch^(-1/4))) in float32; returns [B, T, H ch] with
    channels [H, ch]."""
    batch, length, width = qkv.shape
    if width % (3 * num_heads):
        raise ValueError(f'qkv width {width} is not divisible by 3 * num_heads = {3 * num_heads}')
    ch = width // (3 * num_heads)
    if new_order:
        q, k, v = jnp.moveaxis(qkv.reshape(batch, length, 3, num_heads, ch), 2, 0)
    else:
        q, k, v = jnp.moveaxis(qkv.reshape(batch, length, num_heads, 3, ch), 3, 0)
    scale = 1 / np.sqrt(np.sqrt(ch))
    weight = jnp.einsum('bthc,bshc->bhts', q * scale.astype(q.dtype), k * scale.astype(k.dtype), precision=precision)
    weight = jax.nn.softmax(weight.astype(jnp.float32), axis=-1).astype(qkv.dtype)
    out = jnp.einsum('bhts,bshc->bthc', weight, v, precision=precision)
    return out.reshape(batch, length, num_heads * ch)


def upsample_nearest(x):
    """Nearest-neighbour 2x upsampling of NHWC x (F.interpolate(scale_factor=2, mode='nearest'))."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool2(x):
    """2x2 average pooling with stride 2 of NHWC x (AvgPool2d(kernel_size=2, stride=2), even H and W)."""
    batch, height, width, channels = x.shape
    return x.reshape(batch, height // 2, 2, width // 2, 2, channels).mean(axis=(2, 4))


def scale_shift(normed, emb_scale, emb_shift):
    """ADM's FiLM-like `use_scale_shift_norm`: GroupNorm(h) * (1 + scale) + shift, with `normed` = GroupNorm32(h)
    [B, H, W, C] and the conditioning [B, C] broadcast over H and W; float32."""
    return normed.astype(jnp.float32) * (1 + emb_scale[:, None, None, :].astype(jnp.float32)) \
        + emb_shift[:, None, None, :].astype(jnp.float32)


def num_heads_of(channels, num_heads, num_head_channels):
    """ADM's head count: channels // num_head_channels when num_head_channels != -1, else num_heads."""
    return num_heads if num_head_channels == -1 else channels // num_head_channels


# ---------------------------------------------------------------------------------------------- layers

class GroupNorm32(nn.Module):
    """ADM's normalization(channels): GroupNorm with 32 groups, eps 1e-5, statistics in float32; params 'scale'
    (torch 'weight') and 'bias'. Returns float32 (callers cast)."""

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        scale = self.param('scale', nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param('bias', nn.initializers.zeros, (channels,), jnp.float32)
        return group_norm(x, scale, bias, GROUPS, EPSILON)


class LabelEmbedding(nn.Module):
    """ADM's label_emb (torch nn.Embedding, param 'embedding' [label_dim, features]) applied to one-hot rows:
    labels [B, label_dim] @ embedding, which is the table lookup for one-hot rows (exact: HIGHEST precision)."""
    num_embeddings: int
    features: int

    @nn.compact
    def __call__(self, labels):
        table = self.param('embedding', nn.initializers.normal(1.0), (self.num_embeddings, self.features),
                           jnp.float32)
        return jnp.dot(jnp.asarray(labels, jnp.float32), table, precision=jax.lax.Precision.HIGHEST)


class Conv(nn.Module):
    """k x k convolution of NHWC x, padding k // 2, stride 1 or 2 (torch Conv2d(k, stride, padding=k // 2)),
    kernel HWIO; `zero`: the authors' zero_module."""
    features: int
    kernel_size: int = 3
    stride: int = 1
    zero: bool = False
    precision: Any = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        init = nn.initializers.zeros if self.zero else TORCH_INIT
        kernel = self.param('kernel', init, (k, k, x.shape[-1], self.features), jnp.float32)
        bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
        y = jax.lax.conv_general_dilated(x.astype(self.dtype), kernel.astype(self.dtype), (self.stride,) * 2,
                                         [(k // 2, k // 2)] * 2, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                         precision=self.precision)
        return y + bias.astype(self.dtype)


def Linear(features, zero=False, precision=None, dtype=jnp.float32, name=None):
    """torch Linear (or a 1x1 Conv1d over tokens) as a Flax Dense: kernel [in, out], float32 params."""
    return nn.Dense(features, kernel_init=nn.initializers.zeros if zero else TORCH_INIT,
                    bias_init=nn.initializers.zeros, precision=precision, dtype=dtype, param_dtype=jnp.float32,
                    name=name)


class ResBlock(nn.Module):
    """ADM's ResBlock (module names: in_layers_0 / in_layers_2 / emb_layers_1 / out_layers_0 / out_layers_3 /
    skip_connection, as the authors' Sequential indices)."""
    out_channels: int
    dropout: float = 0.0
    use_scale_shift_norm: bool = False
    up: bool = False
    down: bool = False
    precision: Any = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, emb, train=False):
        channels = x.shape[-1]
        h = nn.silu(GroupNorm32(name='in_layers_0')(x)).astype(self.dtype)
        if self.up:
            h, x = upsample_nearest(h), upsample_nearest(x)
        elif self.down:
            h, x = avg_pool2(h), avg_pool2(x)
        h = Conv(self.out_channels, 3, precision=self.precision, dtype=self.dtype, name='in_layers_2')(h)
        emb_out = Linear(2 * self.out_channels if self.use_scale_shift_norm else self.out_channels,
                         precision=self.precision, dtype=self.dtype, name='emb_layers_1')(nn.silu(emb))
        norm = GroupNorm32(name='out_layers_0')
        if self.use_scale_shift_norm:
            emb_scale, emb_shift = jnp.split(emb_out, 2, axis=-1)
            h = scale_shift(norm(h), emb_scale, emb_shift)
        else:
            h = norm(h + emb_out[:, None, None, :].astype(h.dtype))
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h).astype(self.dtype))
        h = Conv(self.out_channels, 3, zero=True, precision=self.precision, dtype=self.dtype, name='out_layers_3')(h)
        if self.out_channels != channels:
            x = Conv(self.out_channels, 1, precision=self.precision, dtype=self.dtype, name='skip_connection')(x)
        return x.astype(self.dtype) + h


class AttentionBlock(nn.Module):
    """ADM's AttentionBlock over the H*W tokens (module names norm / qkv / proj_out)."""
    num_heads: int = 1
    num_head_channels: int = -1
    use_new_attention_order: bool = False
    precision: Any = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        batch, height, width, channels = x.shape
        heads = num_heads_of(channels, self.num_heads, self.num_head_channels)
        h = GroupNorm32(name='norm')(x).astype(self.dtype).reshape(batch, height * width, channels)
        qkv = Linear(3 * channels, precision=self.precision, dtype=self.dtype, name='qkv')(h)
        h = qkv_attention(qkv, heads, self.use_new_attention_order, self.precision)
        h = Linear(channels, zero=True, precision=self.precision, dtype=self.dtype, name='proj_out')(h)
        return x.astype(self.dtype) + h.reshape(batch, height, width, channels)


class Downsample(nn.Module):
    """ADM's Downsample: conv3x3 stride 2 padding 1 ('op') with use_conv, else 2x2 average pooling."""
    out_channels: int
    use_conv: bool = True
    precision: Any = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.use_conv:
            return Conv(self.out_channels, 3, stride=2, precision=self.precision, dtype=self.dtype, name='op')(x)
        return avg_pool2(x)


class Upsample(nn.Module):
    """ADM's Upsample: nearest 2x, then conv3x3 ('conv') with use_conv."""
    out_channels: int
    use_conv: bool = True
    precision: Any = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = upsample_nearest(x)
        if self.use_conv:
            x = Conv(self.out_channels, 3, precision=self.precision, dtype=self.dtype, name='conv')(x)
        return x


class AttentionPool2d(nn.Module):
    """ADM's AttentionPool2d (CLIP's): tokens [mean, x_1 .. x_HW] + positional_embedding [HW + 1, C], qkv_proj,
    QKVAttention (new order) with C // num_head_channels heads, c_proj of the mean token -> [B, output_dim]."""
    spacial_dim: int
    num_head_channels: int
    output_dim: int
    precision: Any = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        batch, height, width, channels = x.shape
        if height * width != self.spacial_dim ** 2:
            raise ValueError(f'AttentionPool2d for {self.spacial_dim}x{self.spacial_dim} features got {height}x{width}')
        positional = self.param('positional_embedding', nn.initializers.normal(channels ** -0.5),
                                (self.spacial_dim ** 2 + 1, channels), jnp.float32)
        tokens = x.reshape(batch, height * width, channels)
        tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
        tokens = tokens + positional[None].astype(tokens.dtype)
        qkv = Linear(3 * channels, precision=self.precision, dtype=self.dtype, name='qkv_proj')(tokens)
        h = qkv_attention(qkv, channels // self.num_head_channels, True, self.precision)
        return Linear(self.output_dim, precision=self.precision, dtype=self.dtype, name='c_proj')(h[:, 0])


# ---------------------------------------------------------------------------------------------- networks

class _ADMFields(nn.Module):
    """Fields shared by the UNet and the encoder (guided-diffusion's names; `attention_resolutions` holds
    downsample rates, as UNetModel takes them: attention at 16 and 8 of a 32x32 model is (2, 4))."""
    img_resolution: int = 64
    in_channels: int = 3
    out_channels: int = 3
    model_channels: int = 128
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = (4, 8)
    dropout: float = 0.0
    channel_mult: Sequence[float] = (1, 2, 3, 4)
    conv_resample: bool = True
    label_dim: int = 0
    num_heads: int = 4
    num_head_channels: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    precision: Any = None
    dtype: Dtype = jnp.float32

    def _channels(self, mult):
        return int(mult * self.model_channels)

    def _check_common(self):
        if not self.channel_mult:
            raise ValueError('model.channel_mult must not be empty')
        levels = len(self.channel_mult)
        if self.img_resolution % (2 ** (levels - 1)):
            raise ValueError(f'model.img_resolution={self.img_resolution} is not divisible by '
                             f'2^(len(channel_mult)-1)={2 ** (levels - 1)}')
        for mult in self.channel_mult:
            if self._channels(mult) % GROUPS:
                raise ValueError(f'model.model_channels*channel_mult={self._channels(mult)} must be a multiple of '
                                 f'{GROUPS} (GroupNorm32)')
        if self.num_res_blocks < 1:
            raise ValueError(f'model.num_res_blocks={self.num_res_blocks} must be >= 1')
        if not 0 <= self.dropout < 1:
            raise ValueError(f'model.dropout={self.dropout} must lie in [0, 1)')
        heads_up = getattr(self, 'num_heads_upsample', -1)
        heads = [self.num_heads] + ([heads_up] if heads_up != -1 else [])
        for level, mult in enumerate(self.channel_mult):
            channels = self._channels(mult)
            if 2 ** level not in self.attention_resolutions and level != levels - 1:
                continue
            if self.num_head_channels != -1:
                bad = self.num_head_channels < 1 or channels % self.num_head_channels
            else:
                bad = any(n < 1 or channels % n for n in heads)
            if bad:
                raise ValueError(f'model: {channels} attention channels are not divisible into heads '
                                 f'(num_heads={self.num_heads}, num_head_channels={self.num_head_channels}'
                                 + (f', num_heads_upsample={heads_up}' if heads_up != -1 else '') + ')')

    def _time_embedding(self, noise_labels, class_labels, batch):
        emb_dim = 4 * self.model_channels
        noise_labels = jnp.broadcast_to(jnp.asarray(noise_labels, jnp.float32).reshape(-1), (batch,))
        emb = timestep_embedding(noise_labels, self.model_channels).astype(self.dtype)
        emb = Linear(emb_dim, precision=self.precision, dtype=self.dtype, name='time_embed_0')(emb)
        emb = Linear(emb_dim, precision=self.precision, dtype=self.dtype, name='time_embed_2')(nn.silu(emb))
        if self.label_dim:
            labels = jnp.zeros((batch, self.label_dim), jnp.float32) if class_labels is None else class_labels
            labels = jnp.asarray(labels, jnp.float32).reshape(batch, self.label_dim)
            emb = emb + LabelEmbedding(self.label_dim, emb_dim, name='label_emb')(labels).astype(self.dtype)
        return emb

    def _encoder(self, h, emb, train):
        """Input blocks: returns the output of each (the UNet's skips) and the channel count; names
        input_blocks_{i}_{j} as the authors' input_blocks[i][j]."""
        kw = dict(precision=self.precision, dtype=self.dtype)
        res_kw = dict(dropout=self.dropout, use_scale_shift_norm=self.use_scale_shift_norm, **kw)
        attn_kw = dict(num_head_channels=self.num_head_channels,
                       use_new_attention_order=self.use_new_attention_order, **kw)
        h = Conv(self._channels(self.channel_mult[0]), 3, name='input_blocks_0_0', **kw)(h)
        outputs = [h]
        index, ds = 1, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                h = ResBlock(self._channels(mult), name=f'input_blocks_{index}_0', **res_kw)(h, emb, train)
                if ds in self.attention_resolutions:
                    h = AttentionBlock(self.num_heads, name=f'input_blocks_{index}_1', **attn_kw)(h)
                outputs.append(h)
                index += 1
            if level != len(self.channel_mult) - 1:
                channels = h.shape[-1]
                if self.resblock_updown:
                    h = ResBlock(channels, down=True, name=f'input_blocks_{index}_0', **res_kw)(h, emb, train)
                else:
                    h = Downsample(channels, self.conv_resample, name=f'input_blocks_{index}_0', **kw)(h)
                outputs.append(h)
                index += 1
                ds *= 2
        return outputs, ds

    def _middle(self, h, emb, train):
        kw = dict(precision=self.precision, dtype=self.dtype)
        res_kw = dict(dropout=self.dropout, use_scale_shift_norm=self.use_scale_shift_norm, **kw)
        channels = h.shape[-1]
        h = ResBlock(channels, name='middle_block_0', **res_kw)(h, emb, train)
        h = AttentionBlock(self.num_heads, self.num_head_channels, self.use_new_attention_order,
                           name='middle_block_1', **kw)(h)
        h = ResBlock(channels, name='middle_block_2', **res_kw)(h, emb, train)
        self.sow('intermediates', 'bottleneck', h.astype(jnp.float32))
        return h


class ADMUNet(_ADMFields):
    """guided-diffusion's UNetModel (Dhariwal & Nichol 2021), NHWC.

    Call: `apply(variables, x [B, H, W, C], noise_labels [B] (ADM's timesteps; iDDPM's c_noise), class_labels=None
    [B, label_dim] one-hot, augment_labels=None (ignored), train=False, rngs={'dropout': key})` -> [B, H, W,
    out_channels * (2 if learn_sigma else 1)] float32. The middle block's output is sown as
    ('intermediates', 'bottleneck'). Defaults: guided-diffusion's `model_and_diffusion_defaults` at 64x64
    (128 channels, 2 blocks, 4 heads, attention at 16 and 8, channel_mult (1, 2, 3, 4), scale-shift norm).
    num_heads_upsample: heads of the decoder's attention (-1: num_heads; only used when num_head_channels == -1).
    """
    learn_sigma: bool = False
    num_heads_upsample: int = -1

    def validate(self):
        """Raises ValueError naming the first bad field (called by models.build and at trace time)."""
        self._check_common()

    @nn.compact
    def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, train=False):
        del augment_labels
        self.validate()
        batch = x.shape[0]
        kw = dict(precision=self.precision, dtype=self.dtype)
        res_kw = dict(dropout=self.dropout, use_scale_shift_norm=self.use_scale_shift_norm, **kw)
        heads_up = self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample
        attn_kw = dict(num_head_channels=self.num_head_channels,
                       use_new_attention_order=self.use_new_attention_order, **kw)

        emb = self._time_embedding(noise_labels, class_labels, batch)
        skips, ds = self._encoder(x.astype(self.dtype), emb, train)
        h = self._middle(skips[-1], emb, train)
        index = 0
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
                h = ResBlock(self._channels(mult), name=f'output_blocks_{index}_0', **res_kw)(h, emb, train)
                sub = 1
                if ds in self.attention_resolutions:
                    h = AttentionBlock(heads_up, name=f'output_blocks_{index}_1', **attn_kw)(h)
                    sub = 2
                if level and i == self.num_res_blocks:
                    channels = h.shape[-1]
                    if self.resblock_updown:
                        h = ResBlock(channels, up=True, name=f'output_blocks_{index}_{sub}', **res_kw)(h, emb, train)
                    else:
                        h = Upsample(channels, self.conv_resample, name=f'output_blocks_{index}_{sub}', **kw)(h)
                    ds //= 2
                index += 1
        h = nn.silu(GroupNorm32(name='out_0')(h)).astype(self.dtype)
        out_channels = self.out_channels * (2 if self.learn_sigma else 1)
        out = Conv(out_channels, 3, zero=True, name='out_2', **kw)(h)
        return out.astype(jnp.float32)


class ADMEncoder(_ADMFields):
    """guided-diffusion's EncoderUNetModel (the noisy-image classifier), NHWC.

    Call: `apply(variables, x [B, H, W, C], noise_labels [B] (ADM's timesteps), class_labels=None [B, label_dim],
    train=False)` -> logits [B, out_channels] float32. The middle block's output is sown as ('intermediates',
    'bottleneck'). `label_dim` > 0 adds a class embedding (the discriminator guidance authors' conditional
    variant, `condition=True`; guided-diffusion's classifier has none). Defaults: guided-diffusion's
    `classifier_defaults` at 64x64 (width 128, depth 2, attention at 32, 16, 8, scale-shift norm, resblock up/down,
    attention pooling with 64 channels per head) with out_channels = 1000 ImageNet classes.
    """
    out_channels: int = 1000
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = (2, 4, 8)
    num_heads: int = 1
    num_head_channels: int = 64
    resblock_updown: bool = True
    pool: str = 'attention'

    def validate(self):
        """Raises ValueError naming the first bad field."""
        if self.pool not in POOLS:
            raise ValueError(f'model.pool={self.pool!r}; valid: {", ".join(POOLS)}')
        if self.pool == 'attention' and self.num_head_channels == -1:
            raise ValueError("model.pool='attention' needs num_head_channels (channels per head), not -1")
        self._check_common()

    @nn.compact
    def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, train=False):
        del augment_labels
        self.validate()
        batch = x.shape[0]
        kw = dict(precision=self.precision, dtype=self.dtype)
        emb = self._time_embedding(noise_labels, class_labels, batch)
        outputs, ds = self._encoder(x.astype(self.dtype), emb, train)
        h = self._middle(outputs[-1], emb, train)
        if self.pool.startswith('spatial'):
            means = [o.astype(jnp.float32).mean(axis=(1, 2)) for o in outputs] + [h.astype(jnp.float32).mean((1, 2))]
            h = jnp.concatenate(means, axis=-1).astype(self.dtype)
            h = Linear(2048, name='out_0', **kw)(h)
            if self.pool == 'spatial':
                out = Linear(self.out_channels, name='out_2', **kw)(nn.relu(h))
            else:
                h = GroupNorm32(name='out_1')(h[:, None, None, :])[:, 0, 0, :]
                out = Linear(self.out_channels, name='out_3', **kw)(nn.silu(h).astype(self.dtype))
            return out.astype(jnp.float32)
        h = nn.silu(GroupNorm32(name='out_0')(h)).astype(self.dtype)
        if self.pool == 'adaptive':
            out = Conv(self.out_channels, 1, zero=True, name='out_3', **kw)(h.mean(axis=(1, 2), keepdims=True))
            return out[:, 0, 0, :].astype(jnp.float32)
        out = AttentionPool2d(self.img_resolution // ds, self.num_head_channels, self.out_channels, name='out_2',
                              **kw)(h)
        return out.astype(jnp.float32)
