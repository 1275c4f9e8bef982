"""AMED predictor: the ~9k-parameter network that picks each step's intermediate time (Zhou et al., CVPR 2024).

Zhou, Chen, Wang, Chen, "Fast ODE-based Sampling for Diffusion Models in Around 5 Steps" (AMED), Sec. 3.2 and
App. B: for the interval t_n -> t_{n+1} the predictor reads the UNet bottleneck of the denoiser call at (x_n, t_n)
and the two times, and outputs
  r_n in (0, 1)            the geometric position of the intermediate time s_n = t_n^(1 - r_n) t_{n+1}^(r_n),
  c_n in (1 - eps_c, 1 + eps_c)   the scale of the mean direction's increment,
  a_n in (1 - eps_a, 1 + eps_a)   the scale of the model time at s_n (eps_a = 0: a_n = 1).

Input features (20): the bottleneck averaged over channels and flattened ([B, H*W], 64 values for an 8x8
bottleneck; zeros when there was no call or the denoiser has no bottleneck) through Dense(128) -> SiLU -> Dense(4),
and t_n, t_{n+1}, each through an 8-channel sinusoidal embedding and a shared Dense(8) + SiLU.
Times enter the embedding as EDM's noise label c_noise = ln(t) / 4 (Karras et al. 2022, Table 1), a smooth
coordinate over the whole range 0.002..80.
"""
import flax.linen as nn
import jax.numpy as jnp

from jaxdiff.models.layers import positional_embedding


def time_label(t):
    """c_noise = ln(t) / 4 (EDM Table 1), the coordinate the time embedding reads."""
    return jnp.log(t) / 4


class AMEDPredictor(nn.Module):
    """`apply(variables, bottleneck [B, num_bottleneck], t_cur [B], t_next [B]) -> (r, c, a)`, each [B]."""
    num_bottleneck: int = 64        # H * W of the denoiser's bottleneck (8x8 for the CIFAR-10 SongUNet)
    hidden: int = 128
    bottleneck_features: int = 4
    time_channels: int = 8
    eps_c: float = 0.01
    eps_a: float = 0.0

    @nn.compact
    def __call__(self, bottleneck, t_cur, t_next):
        if bottleneck.ndim != 2 or bottleneck.shape[1] != self.num_bottleneck:
            raise ValueError(f'AMEDPredictor expects bottleneck features [B, {self.num_bottleneck}], '
                             f'got {bottleneck.shape}')
        batch = bottleneck.shape[0]
        t_cur = jnp.broadcast_to(jnp.asarray(t_cur, jnp.float32).reshape(-1), (batch,))
        t_next = jnp.broadcast_to(jnp.asarray(t_next, jnp.float32).reshape(-1), (batch,))
        time_dense = nn.Dense(self.time_channels, name='time_dense')   # shared by t_n and t_{n+1}
        embed = lambda t: nn.silu(time_dense(positional_embedding(time_label(t), self.time_channels)))
        h = nn.Dense(self.bottleneck_features, name='bottleneck_out')(
            nn.silu(nn.Dense(self.hidden, name='bottleneck_in')(bottleneck.astype(jnp.float32))))
        features = jnp.concatenate([embed(t_cur), embed(t_next), h], axis=-1)      # [B, 20]
        head = lambda name: nn.Dense(1, name=name)(features)[:, 0]
        r = nn.sigmoid(head('r_head'))
        c = 1.0 + self.eps_c * jnp.tanh(head('c_head'))
        a = 1.0 + self.eps_a * jnp.tanh(head('a_head'))
        return r, c, a
