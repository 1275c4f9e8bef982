"""The Fast-ODE networks: the encoder q_phi(z | x) and the authors' 2-D tanh MLP.

Lee, Kim, Ye, "Minimizing Trajectory Curvature of ODE-based Generative Models" (ICML 2023), as their public code
configures them:
  UNetEncoder  a small SongUNet fed the clean image x and the constant time t = 1, with 2C output channels split
               into (mu, logvar); CIFAR-10 and MNIST: model_channels 32, channel_mult (2, 2, 2), 2 blocks per level,
               attention at 16x16, dropout 0.13 (their cifar10_en.json / mnist_en.json). At 28x28x1: 2,155,778
               parameters, their 2,155,201 of the same UNet with one output channel (the json's num_params) plus
               the second output channel's 3x3 filter from 64 channels (577). The output convolution starts near
               zero (EDM's init), so q starts at N(0, I).
  TanhMLP      concat(x, t) -> [Dense(100), tanh] x 2 -> Dense: their 2-D flow network (time fed raw), with the
               call signature of the other denoiser networks (models/__init__.py).
  MLPEncoder   the same MLP fed (x, t = 1) with 2d outputs -> (mu, logvar): their 2-D encoder.
Encoders are called as `apply(variables, x, noise_labels=None, train=False, rngs={'dropout': key}) -> (mu, logvar)`,
each shaped like x; noise_labels is accepted and ignored (the encoder's time is the constant `time`), so the training
loop initialises an encoder like any network (`models.init(module, data_shape, key)` passes noise labels) and the
Fast-ODE pairing (`flow.fastode_pairing`) calls it as an extra network with x alone. Registered in
models/__init__.py as 'fastode_encoder' (UNetEncoder), 'fastode_mlp_encoder' (MLPEncoder) and 'tanh_mlp' (TanhMLP).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxdiff.models.songunet import SongUNet


class UNetEncoder(nn.Module):
    """q_phi(z | x) = N(mu, diag exp(logvar)) from a SongUNet with out_channels = 2 in_channels, noise label 1."""
    img_resolution: int = 32
    in_channels: int = 3
    model_channels: int = 32
    channel_mult: Sequence[int] = (2, 2, 2)
    channel_mult_emb: int = 4
    num_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.13
    embedding_type: str = 'positional'
    channel_mult_noise: int = 1
    encoder_type: str = 'standard'
    decoder_type: str = 'standard'
    resample_filter: Sequence[int] = (1, 1)
    time: float = 1.0               # the constant time the authors feed the encoder
    dtype: Any = jnp.float32

    def _unet_fields(self):
        return dict(img_resolution=self.img_resolution, in_channels=self.in_channels,
                    out_channels=2 * self.in_channels, label_dim=0, augment_dim=0,
                    model_channels=self.model_channels, channel_mult=tuple(self.channel_mult),
                    channel_mult_emb=self.channel_mult_emb, num_blocks=self.num_blocks,
                    attn_resolutions=tuple(self.attn_resolutions), dropout=self.dropout,
                    embedding_type=self.embedding_type, channel_mult_noise=self.channel_mult_noise,
                    encoder_type=self.encoder_type, decoder_type=self.decoder_type,
                    resample_filter=tuple(self.resample_filter), dtype=self.dtype)

    def validate(self):
        """Raises ValueError naming the first bad field (SongUNet's checks)."""
        SongUNet(**self._unet_fields(), parent=None).validate()

    @nn.compact
    def __call__(self, x, noise_labels=None, train=False):
        del noise_labels                     # q(z | x) sees the constant time t = 1 only
        out = SongUNet(**self._unet_fields(), name='unet')(x, jnp.full((x.shape[0],), self.time), train=train)
        mu, logvar = jnp.split(out, 2, axis=-1)
        return mu, logvar


class TanhMLP(nn.Module):
    """The authors' 2-D network: concat(x flattened, t) -> num_layers x [Dense(hidden_dim), tanh] -> Dense(out).

    `apply(variables, x [B, ...], noise_labels [B], class_labels=None, augment_labels=None, train=False)` ->
    [B, out_features], reshaped to x.shape when out_features is 0 (= x's size). Used raw (no preconditioning) as a
    velocity network. It sows no 'bottleneck' (models/__init__.py): AMED's predictor reads a [B, h, w, C] feature map,
    which a 2-D MLP does not have, so on this network it reads zeros and learns a per-step schedule."""
    hidden_dim: int = 100
    num_layers: int = 2
    out_features: int = 0
    dtype: Any = jnp.float32

    def validate(self):
        if self.hidden_dim < 1 or self.num_layers < 1 or self.out_features < 0:
            raise ValueError(f'model.hidden_dim={self.hidden_dim} and model.num_layers={self.num_layers} must be '
                             f'>= 1, model.out_features={self.out_features} >= 0')

    @nn.compact
    def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, train=False):
        del class_labels, augment_labels, train
        self.validate()
        batch = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(noise_labels, self.dtype).reshape(-1), (batch,))
        h = jnp.concatenate([x.reshape(batch, -1).astype(self.dtype), t[:, None]], axis=-1)
        for index in range(self.num_layers):
            h = jnp.tanh(nn.Dense(self.hidden_dim, dtype=self.dtype, name=f'layer{index}')(h))
        out_dtype = jnp.promote_types(self.dtype, jnp.float32)          # bf16 compute -> float32 out
        out = nn.Dense(self.out_features or x[0].size, dtype=self.dtype, name='output')(h).astype(out_dtype)
        return out if self.out_features else out.reshape(x.shape)


class MLPEncoder(nn.Module):
    """q_phi(z | x) for vector data: TanhMLP(x, t = 1) with 2d outputs split into (mu, logvar), each shaped like x."""
    hidden_dim: int = 100
    num_layers: int = 2
    time: float = 1.0
    dtype: Any = jnp.float32

    def validate(self):
        TanhMLP(self.hidden_dim, self.num_layers, parent=None).validate()

    @nn.compact
    def __call__(self, x, noise_labels=None, train=False):
        del noise_labels, train              # q(z | x) sees the constant time t = 1 only
        out = TanhMLP(self.hidden_dim, self.num_layers, out_features=2 * x[0].size, dtype=self.dtype, name='mlp')(
            x, jnp.full((x.shape[0],), self.time))
        mu, logvar = jnp.split(out, 2, axis=-1)
        return mu.reshape(x.shape), logvar.reshape(x.shape)
