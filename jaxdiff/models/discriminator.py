"""Time-conditioned discriminators for discriminator guidance (Kim, Kim, Kwon, Kang, Moon, ICML 2023).

The discriminator d(x, sigma) separates perturbed data (label 1) from perturbed model samples (label 0); guidance
reads its logit log(d / (1 - d)) (`jaxdiff.core.guidance`). Both networks here return that logit, [B], no sigmoid.

  DiscriminatorHead  the authors' trainable head on frozen features [B, h, w, C] (theirs: ADM's 32x32 classifier
                     encoder, [B, 8, 8, 512]; here the trained jaxdiff denoiser's own encoder, read through Flax
                     `sow` by a features callable): a 3x3 input convolution, num_blocks residual blocks with
                     self-attention at the feature resolution (EDM's UNetBlock, models/layers.py), GroupNorm + SiLU,
                     ADM's attention pooling to one logit. The noise level enters as a sinusoidal embedding of
                     c_noise = ln(sigma) / 4 (EDM Table 1) through a 2-layer SiLU MLP; class-conditional heads add
                     a projection of the one-hot label to it (label_dim > 0). Defaults follow their head: width
                     128, 2 blocks, 64 channels per attention head.
  MLPDiscriminator   for 2-D / vector data: x scaled by c_in = 1 / sqrt(sigma^2 + sigma_data^2) (with
                     sigma_data = 1 the VP-scaled input the authors feed their networks) and the same noise-level
                     embedding, a residual SiLU MLP, one logit.

The features must not be cut from x by stop_gradient: guidance differentiates the logit with respect to x through
the frozen feature network (frozen = its parameters are not trained). `make_logit_fn` composes the pieces;
`build(name, **fields)` makes one from a config (NETWORKS: 'head', 'mlp').
"""
import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.layers import INIT, Conv2d, Dense, GroupNorm, UNetBlock, positional_embedding


def noise_label(sigma):
    """c_noise = ln(sigma) / 4 (Karras et al. 2022, Table 1): a smooth time coordinate over 0.002..80."""
    return jnp.log(sigma) / 4


def _sigma_per_example(sigma, batch):
    return jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), (batch,))


class _NoiseEmbedding(nn.Module):
    """Sinusoidal embedding of c_noise (+ a bias-free projection of one-hot labels) -> 2-layer SiLU MLP."""
    channels: int
    out_channels: int
    label_dim: int = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, sigma, class_labels):
        emb = positional_embedding(noise_label(sigma), self.channels).astype(self.dtype)
        if self.label_dim:
            labels = jnp.zeros((sigma.shape[0], self.label_dim)) if class_labels is None else class_labels
            emb = emb + Dense(self.channels, use_bias=False, **INIT, dtype=self.dtype, name='map_label')(
                labels.astype(jnp.float32))
        emb = nn.silu(Dense(self.out_channels, **INIT, dtype=self.dtype, name='map_layer0')(emb))
        return nn.silu(Dense(self.out_channels, **INIT, dtype=self.dtype, name='map_layer1')(emb))


class AttentionPool(nn.Module):
    """ADM's attention pooling (Dhariwal & Nichol 2021, AttentionPool2d): the spatial mean is prepended to the h*w
    tokens, a learned positional embedding is added, and the mean token's multi-head attention output over all
    tokens is projected to out_features. Logits and softmax in float32."""
    num_heads: int = 1
    out_features: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        batch, height, width, channels = x.shape
        tokens = x.reshape(batch, height * width, channels)
        tokens = jnp.concatenate([jnp.mean(tokens, axis=1, keepdims=True), tokens], axis=1)       # [B, T, C]
        position = self.param('positional_embedding', nn.initializers.normal(channels ** -0.5),
                              (height * width + 1, channels), jnp.float32)
        tokens = tokens + position[None].astype(tokens.dtype)
        head_channels = channels // self.num_heads
        qkv = Dense(3 * channels, **INIT, dtype=self.dtype, name='qkv')(tokens)
        q, k, v = jnp.moveaxis(qkv.reshape(batch, tokens.shape[1], 3, self.num_heads, head_channels), 2, 0)
        logits = jnp.einsum('bhc,bkhc->bhk', q[:, 0].astype(jnp.float32), k.astype(jnp.float32))
        w = jax.nn.softmax(logits / np.sqrt(head_channels), axis=-1)
        pooled = jnp.einsum('bhk,bkhc->bhc', w.astype(v.dtype), v).reshape(batch, channels)
        return Dense(self.out_features, **INIT, dtype=self.dtype, name='out')(pooled)


class DiscriminatorHead(nn.Module):
    """`apply(variables, features [B, h, w, C], sigma [B] or scalar, class_labels=None [B, label_dim], train=False,
    rngs={'dropout': key})` -> logit [B]."""
    model_channels: int = 128
    num_blocks: int = 2
    attention: bool = True
    num_heads: int = 2
    channel_mult_emb: int = 4
    label_dim: int = 0
    dropout: float = 0.0
    dtype: Any = jnp.float32

    def validate(self):
        """Raises ValueError naming the first bad field."""
        if self.model_channels < 4 or self.model_channels % 4:
            raise ValueError(f'discriminator.model_channels={self.model_channels} must be a positive multiple of 4 '
                             '(GroupNorm needs at least 4 channels per group)')
        if self.num_heads < 1 or self.model_channels % self.num_heads:
            raise ValueError(f'discriminator.num_heads={self.num_heads} must divide '
                             f'model_channels={self.model_channels}')
        if self.num_blocks < 0 or self.label_dim < 0 or not 0 <= self.dropout < 1:
            raise ValueError(f'discriminator.num_blocks={self.num_blocks} and label_dim={self.label_dim} must be '
                             f'>= 0 and dropout={self.dropout} in [0, 1)')

    @nn.compact
    def __call__(self, features, sigma, class_labels=None, train=False):
        self.validate()
        if features.ndim != 4:
            raise ValueError(f'DiscriminatorHead expects features [B, h, w, C], got shape {features.shape}')
        sigma = _sigma_per_example(sigma, features.shape[0])
        emb = _NoiseEmbedding(self.model_channels, self.model_channels * self.channel_mult_emb, self.label_dim,
                              self.dtype, name='embedding')(sigma, class_labels)
        h = Conv2d(self.model_channels, 3, **INIT, dtype=self.dtype, name='input')(features.astype(self.dtype))
        for index in range(self.num_blocks):
            h = UNetBlock(self.model_channels, attention=self.attention, num_heads=self.num_heads,
                          dropout=self.dropout, dtype=self.dtype, name=f'block{index}')(h, emb, train)
        h = nn.silu(GroupNorm(epsilon=1e-6, dtype=self.dtype, name='norm')(h))
        return AttentionPool(self.num_heads, 1, self.dtype, name='pool')(h)[:, 0].astype(jnp.float32)


class MLPDiscriminator(nn.Module):
    """`apply(variables, x [B, ...], sigma [B] or scalar, class_labels=None, train=False)` -> logit [B]:
    h = Dense(c_in x); num_layers x [h = h + Dense(silu(LayerNorm(h) + emb))]; logit = Dense(silu(h))."""
    hidden_dim: int = 128
    num_layers: int = 3
    embedding_dim: int = 64
    sigma_data: float = 1.0
    label_dim: int = 0
    dropout: float = 0.0
    dtype: Any = jnp.float32

    def validate(self):
        if self.hidden_dim < 1 or self.num_layers < 0 or self.embedding_dim < 2 or self.embedding_dim % 2:
            raise ValueError(f'discriminator.hidden_dim={self.hidden_dim} must be >= 1, num_layers='
                             f'{self.num_layers} >= 0 and embedding_dim={self.embedding_dim} even and >= 2')
        if not self.sigma_data > 0 or not 0 <= self.dropout < 1:
            raise ValueError(f'discriminator.sigma_data={self.sigma_data} must be > 0 and dropout={self.dropout} '
                             'in [0, 1)')

    @nn.compact
    def __call__(self, x, sigma, class_labels=None, train=False):
        self.validate()
        batch = x.shape[0]
        sigma = _sigma_per_example(sigma, batch)
        emb = _NoiseEmbedding(self.embedding_dim, self.hidden_dim, self.label_dim, self.dtype, name='embedding')(
            sigma, class_labels)
        c_in = (1 / jnp.sqrt(sigma ** 2 + self.sigma_data ** 2)).astype(x.dtype)
        h = Dense(self.hidden_dim, **INIT, dtype=self.dtype, name='input')(
            (c_in[:, None] * x.reshape(batch, -1)).astype(self.dtype))
        for index in range(self.num_layers):
            z = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name=f'norm{index}')(h)
            z = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(z + emb))
            h = h + Dense(self.hidden_dim, **INIT, dtype=self.dtype, name=f'layer{index}')(z)
        return Dense(1, **INIT, dtype=self.dtype, name='output')(nn.silu(h))[:, 0].astype(jnp.float32)


def make_logit_fn(apply_fn: Callable, params, features_fn: Optional[Callable] = None, class_labels=None):
    """logit_fn(x, sigma) -> [B] for `guidance.discriminator_guided`: apply_fn({'params': params}, inputs, sigma,
    class_labels=...) with inputs = features_fn(x, sigma) (frozen features, differentiable in x) or x itself."""
    def logit_fn(x, sigma):
        inputs = x if features_fn is None else features_fn(x, sigma)
        return apply_fn({'params': params}, inputs, sigma, class_labels=class_labels)
    return logit_fn


NETWORKS = {'head': DiscriminatorHead, 'mlp': MLPDiscriminator}


def build(name, **fields):
    """NETWORKS[name](**fields), validated; an unknown name or field is a ValueError listing the valid ones
    (config.discriminator.network = dict(name=..., <fields>))."""
    if name not in NETWORKS:
        raise ValueError(f'unknown discriminator network {name!r}; valid: {", ".join(sorted(NETWORKS))}')
    cls = NETWORKS[name]
    valid = [f.name for f in dataclasses.fields(cls) if f.name not in ('parent', 'name')]
    unknown = sorted(set(fields) - set(valid))
    if unknown:
        raise ValueError(f'discriminator network {name!r} has no field(s) {", ".join(unknown)}; valid fields: '
                         f'{", ".join(valid)}')
    if 'dtype' in fields:
        fields = dict(fields, dtype=jnp.dtype(fields['dtype']))
    network = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    network.validate()
    return network
