"""A trained network as a SPEC denoiser: `D(x, sigma) -> x0_hat`, plus `D.with_aux(x, sigma) -> (x0_hat, aux)`.

D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) (EDM eq. 7) with the coefficients of the parameterization the
network was trained with (precond.py). `with_aux` also returns {'bottleneck': [B, 8, 8, C]} for learned samplers
(see samplers/common.py for the aux convention).
"""
import jax.numpy as jnp

from jaxdiff import precond as precond_lib


class Denoiser:
    """apply_fn: a Flax `model.apply`; params: the model's 'params' collection; precond: sigma -> Coefficients
    (e.g. `losses.build(**config.loss).parameterization.precond`); class_labels: [B, label_dim] one-hot or None."""

    def __init__(self, apply_fn, params, precond, *, class_labels=None, buffers=None):
        self.apply_fn = apply_fn
        self.params = params
        self.buffers = buffers or {}   # the model's non-trainable collections (e.g. NCSN++'s 'buffers')
        self.precond = precond
        self.class_labels = class_labels

    def _denoise(self, x, sigma, return_bottleneck):
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
        aux = {}

        def F(x_in, c_noise):
            out = self.apply_fn({'params': self.params, **self.buffers}, x_in, c_noise, class_labels=self.class_labels,
                                train=False, return_bottleneck=return_bottleneck)
            if return_bottleneck:
                out, aux['bottleneck'] = out
            return out

        return precond_lib.apply(F, x, self.precond(sigma)), aux

    def __call__(self, x, sigma):
        return self._denoise(x, sigma, return_bottleneck=False)[0]

    def with_aux(self, x, sigma):
        return self._denoise(x, sigma, return_bottleneck=True)
