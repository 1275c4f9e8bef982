"""A small MLP denoiser network for low-dimensional data (2-D toy distributions, flattened tiny images).

Same call signature as SongUNet so the EDM preconditioning (Karras et al. 2022, eq. 7) and the samplers treat both
alike: `apply(variables, x [B, ...], noise_labels [B], class_labels=None, augment_labels=None, train=False)` -> F of
shape x.shape; the last hidden activation h [B, hidden_dim] is sown as ('intermediates', 'bottleneck').
The noise level enters through the transformer sinusoidal embedding of c_noise (as DDPM++ in Song et al. 2021),
mapped by a 2-layer SiLU MLP and added to every hidden layer.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxdiff.models.layers import INIT, INIT_ZERO, Dense, positional_embedding


class MLP(nn.Module):
    """Residual SiLU MLP: h = Dense(x); num_layers x [h = h + Dense(silu(LayerNorm(h) + emb))]; F = Dense(silu(h)).

    The output layer starts near zero (EDM's init_weight=1e-5), so F ~ 0 and D ~ c_skip x at initialisation.
    `augment_labels` is accepted and ignored (no augmentation for vector data).
    """
    hidden_dim: int = 128
    num_layers: int = 3
    embedding_dim: int = 64
    label_dim: int = 0
    dropout: float = 0.0
    dtype: Any = jnp.float32

    def validate(self):
        """Raises ValueError naming the first bad field."""
        if self.hidden_dim < 1 or self.num_layers < 0 or self.embedding_dim < 2 or self.embedding_dim % 2:
            raise ValueError(f'model.hidden_dim={self.hidden_dim} must be >= 1, model.num_layers={self.num_layers} '
                             f'>= 0 and model.embedding_dim={self.embedding_dim} even and >= 2')
        if not 0 <= self.dropout < 1:
            raise ValueError(f'model.dropout={self.dropout} must lie in [0, 1)')

    @nn.compact
    def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, train=False):
        del augment_labels
        self.validate()
        batch = x.shape[0]
        noise_labels = jnp.broadcast_to(jnp.asarray(noise_labels).reshape(-1), (batch,))
        emb = positional_embedding(noise_labels, self.embedding_dim, endpoint=True).astype(self.dtype)
        if self.label_dim:
            labels = jnp.zeros((batch, self.label_dim), jnp.float32) if class_labels is None else class_labels
            emb = emb + Dense(self.embedding_dim, **INIT, dtype=self.dtype, name='map_label')(labels)
        emb = nn.silu(Dense(self.hidden_dim, **INIT, dtype=self.dtype, name='map_layer0')(emb))
        emb = nn.silu(Dense(self.hidden_dim, **INIT, dtype=self.dtype, name='map_layer1')(emb))

        h = Dense(self.hidden_dim, **INIT, dtype=self.dtype, name='input')(x.reshape(batch, -1).astype(self.dtype))
        for index in range(self.num_layers):
            z = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name=f'norm{index}')(h)
            z = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(z + emb))
            h = h + Dense(self.hidden_dim, **INIT, dtype=self.dtype, name=f'layer{index}')(z)
        self.sow('intermediates', 'bottleneck', h.astype(jnp.float32))
        out = Dense(x[0].size, **INIT_ZERO, dtype=self.dtype, name='output')(nn.silu(h))
        return out.reshape(x.shape).astype(jnp.float32)
