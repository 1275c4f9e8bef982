"""SongUNet: the DDPM++ / NCSN++ backbone of Song et al. 2021 (score_sde) in the form EDM trains it.

Karras et al. 2022 (EDM), App. F.2 and Table 7: CIFAR-10 uses model_channels=128, channel_mult=(2, 2, 2),
num_blocks=4, attention at 16x16, dropout 0.13, augment_dim=9; DDPM++ = positional noise embedding, standard
encoder/decoder, resample filter [1, 1]; NCSN++ = Fourier noise embedding (scale 16, 2x noise channels), residual
encoder, resample filter [1, 3, 3, 1]. With those settings the trainable parameter counts are 55,733,891 (DDPM++)
and 56,397,827 (NCSN++), as in EDM.

The module returns the raw network output F (EDM eq. 7: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise));
preconditioning lives in `jaxdiff.core.precond`. NCSN++'s Fourier frequencies are a variable of the 'buffers' collection
(drawn at init, never trained); `conv_algorithm` picks how the 3x3 convolutions run (outputs equal to round-off).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.layers import CONV_ALGORITHMS, INIT, INIT_ZERO, Conv2d, Dense, FourierEmbedding, GroupNorm, \
    UNetBlock, positional_embedding

EMBEDDING_TYPES = ('positional', 'fourier')
ENCODER_TYPES = ('standard', 'skip', 'residual')
DECODER_TYPES = ('standard', 'skip')


class SongUNet(nn.Module):
    """DDPM++ / NCSN++ UNet (score_sde; EDM's SongUNet), NHWC.

    Call: `apply(variables, x [B,H,W,C], noise_labels [B], class_labels=None [B,label_dim],
    augment_labels=None [B,augment_dim], train=False, rngs={'dropout': key})` -> F of shape x.shape.
    variables: {'params': ...} (and {'buffers': ...} for embedding_type='fourier'), as `init` returns them.
    The encoder's output at the lowest resolution, [B, H / 2^(L-1), W / 2^(L-1), model_channels * channel_mult[-1]]
    (float32), is sown as ('intermediates', 'bottleneck'): `apply(..., mutable=['intermediates'])` returns it too.
    Dropout (and label dropout) only when train. Missing class/augment labels count as zeros (EDM's "no label" /
    "no augmentation"), so every parameter is created at init whatever is passed.
    conv_algorithm: 'xla' (lax.conv_general_dilated), 'winograd' (F(2x2, 3x3) batched matmuls for the 3x3 layers,
    models/winograd.py) or 'auto' (the faster one on the backend in use, layers.AUTO_CONV_ALGORITHM).
    """
    img_resolution: int = 32
    in_channels: int = 3
    out_channels: int = 3
    label_dim: int = 0
    augment_dim: int = 0
    model_channels: int = 128
    channel_mult: Sequence[int] = (1, 2, 2, 2)
    channel_mult_emb: int = 4
    num_blocks: int = 4
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.10
    label_dropout: float = 0.0
    embedding_type: str = 'positional'
    channel_mult_noise: int = 1
    encoder_type: str = 'standard'
    decoder_type: str = 'standard'
    resample_filter: Sequence[int] = (1, 1)
    conv_algorithm: str = 'auto'
    dtype: Any = jnp.float32

    def validate(self):
        """Raises ValueError naming the first inconsistent field (called by models.build and at trace time)."""
        for field, value, valid in (('embedding_type', self.embedding_type, EMBEDDING_TYPES),
                                    ('encoder_type', self.encoder_type, ENCODER_TYPES),
                                    ('decoder_type', self.decoder_type, DECODER_TYPES),
                                    ('conv_algorithm', self.conv_algorithm, CONV_ALGORITHMS)):
            if value not in valid:
                raise ValueError(f'model.{field}={value!r}; valid: {", ".join(valid)}')
        if not self.channel_mult:
            raise ValueError('model.channel_mult must not be empty')
        levels = len(self.channel_mult)
        if self.img_resolution % (2 ** (levels - 1)):
            raise ValueError(f'model.img_resolution={self.img_resolution} is not divisible by 2^(len(channel_mult)-1)'
                             f'={2 ** (levels - 1)}')
        if not 0 <= self.dropout < 1 or not 0 <= self.label_dropout < 1:
            raise ValueError(f'model.dropout={self.dropout} and model.label_dropout={self.label_dropout} '
                             'must lie in [0, 1)')
        for mult in self.channel_mult:
            if (self.model_channels * mult) % 4:
                raise ValueError(f'model.model_channels*channel_mult={self.model_channels * mult} must be a multiple '
                                 'of 4 (GroupNorm needs at least 4 channels per group)')

    def _embedding(self, noise_labels, class_labels, augment_labels, train):
        """Mapping network: noise embedding (+ label and augmentation projections) -> 2-layer SiLU MLP."""
        batch = noise_labels.shape[0]
        noise_channels = self.model_channels * self.channel_mult_noise
        emb_channels = self.model_channels * self.channel_mult_emb
        if self.embedding_type == 'positional':
            emb = positional_embedding(noise_labels, noise_channels, endpoint=True)
        else:
            emb = FourierEmbedding(noise_channels, scale=16.0, name='map_noise')(noise_labels)
        emb = emb.astype(self.dtype)
        if self.label_dim:
            labels = jnp.zeros((batch, self.label_dim), jnp.float32) if class_labels is None else class_labels
            labels = labels.astype(jnp.float32)
            if train and self.label_dropout:
                keep = jax.random.uniform(self.make_rng('dropout'), (batch, 1)) >= self.label_dropout
                labels = labels * keep
            emb = emb + Dense(noise_channels, **INIT, dtype=self.dtype, name='map_label')(
                labels * np.sqrt(self.label_dim))
        if self.augment_dim:
            # EDM skips map_augment when no labels are given; a bias-free projection of zeros is the same thing.
            augment = jnp.zeros((batch, self.augment_dim), jnp.float32) if augment_labels is None else augment_labels
            emb = emb + Dense(noise_channels, use_bias=False, **INIT, dtype=self.dtype, name='map_augment')(augment)
        emb = nn.silu(Dense(emb_channels, **INIT, dtype=self.dtype, name='map_layer0')(emb))
        return nn.silu(Dense(emb_channels, **INIT, dtype=self.dtype, name='map_layer1')(emb))

    @nn.compact
    def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, train=False):
        self.validate()
        expected = (self.img_resolution, self.img_resolution, self.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f'SongUNet expects x of shape [B, {", ".join(map(str, expected))}], got {x.shape}')
        noise_labels = jnp.broadcast_to(jnp.asarray(noise_labels).reshape(-1), (x.shape[0],))
        emb = self._embedding(noise_labels, class_labels, augment_labels, train)

        conv = dict(resample_filter=self.resample_filter, conv_algorithm=self.conv_algorithm, dtype=self.dtype)
        block = dict(dropout=self.dropout, **conv)
        levels = len(self.channel_mult)

        # Encoder. `skips` holds every block output (not the aux branches) for the decoder's concatenations.
        x = x.astype(self.dtype)
        aux = x
        skips = []
        for level, mult in enumerate(self.channel_mult):
            res = self.img_resolution >> level
            if level == 0:
                x = Conv2d(self.model_channels, 3, **conv, **INIT, name=f'enc_{res}x{res}_conv')(x)
                skips.append(x)
            else:
                x = UNetBlock(x.shape[-1], down=True, **block, name=f'enc_{res}x{res}_down')(x, emb, train)
                skips.append(x)
                if self.encoder_type == 'skip':  # score_sde's input skip: downsampled image, 1x1 projected
                    aux = Conv2d(aux.shape[-1], 0, down=True, **conv, name=f'enc_{res}x{res}_aux_down')(aux)
                    x = skips[-1] = x + Conv2d(x.shape[-1], 1, **conv, **INIT, name=f'enc_{res}x{res}_aux_skip')(aux)
                elif self.encoder_type == 'residual':  # NCSN++'s progressive residual input path
                    residual = Conv2d(x.shape[-1], 3, down=True, fused_resample=True, **conv, **INIT,
                                      name=f'enc_{res}x{res}_aux_residual')(aux)
                    x = skips[-1] = aux = (x + residual) / np.sqrt(2)
            for index in range(self.num_blocks):
                x = UNetBlock(self.model_channels * mult, attention=res in self.attn_resolutions, **block,
                              name=f'enc_{res}x{res}_block{index}')(x, emb, train)
                skips.append(x)
        self.sow('intermediates', 'bottleneck', x.astype(jnp.float32))

        # Decoder. `aux` accumulates the output image (decoder_type='skip' adds one per level; 'standard' only at 0).
        aux = None
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            res = self.img_resolution >> level
            if level == levels - 1:
                x = UNetBlock(x.shape[-1], attention=True, **block, name=f'dec_{res}x{res}_in0')(x, emb, train)
                x = UNetBlock(x.shape[-1], **block, name=f'dec_{res}x{res}_in1')(x, emb, train)
            else:
                x = UNetBlock(x.shape[-1], up=True, **block, name=f'dec_{res}x{res}_up')(x, emb, train)
            for index in range(self.num_blocks + 1):
                x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
                attention = index == self.num_blocks and res in self.attn_resolutions
                x = UNetBlock(self.model_channels * mult, attention=attention, **block,
                              name=f'dec_{res}x{res}_block{index}')(x, emb, train)
            if self.decoder_type == 'skip' or level == 0:
                if self.decoder_type == 'skip' and level < levels - 1:
                    aux = Conv2d(self.out_channels, 0, up=True, **conv, name=f'dec_{res}x{res}_aux_up')(aux)
                h = GroupNorm(epsilon=1e-6, dtype=self.dtype, name=f'dec_{res}x{res}_aux_norm')(x)
                h = Conv2d(self.out_channels, 3, **conv, **INIT_ZERO, name=f'dec_{res}x{res}_aux_conv')(nn.silu(h))
                aux = h if aux is None else h + aux
        return aux.astype(jnp.float32)
