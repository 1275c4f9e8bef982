"""A trained network as a SPEC denoiser: `D(x, sigma) -> x0_hat`, plus `D.with_aux(x, sigma) -> (x0_hat, aux)`.

D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) (EDM eq. 7) with the coefficients of the parameterization the
network was trained with (precond.py). `with_aux` also returns what the network sows into its 'intermediates'
collection, e.g. {'bottleneck': [B, 8, 8, C]} for learned samplers (see samplers/common.py for the aux convention);
the plain call never collects it.
"""
import jax.numpy as jnp

from jaxdiff.core import precond as precond_lib


class Denoiser:
    """apply_fn: a Flax `model.apply`; params: the model's 'params' collection; precond: sigma -> Coefficients
    (e.g. `losses.build(**config.loss).parameterization.precond`); class_labels: [B, label_dim] one-hot or None;
    buffers: the model's other variable collections, e.g. {'buffers': ...} of NCSN++ (`models.init` minus 'params')."""

    def __init__(self, apply_fn, params, precond, *, class_labels=None, buffers=None):
        self.apply_fn = apply_fn
        self.params = params
        self.buffers = buffers or {}
        self.precond = precond
        self.class_labels = class_labels

    def _F(self, x_in, c_noise, **kwargs):
        return self.apply_fn({'params': self.params, **self.buffers}, x_in, c_noise, class_labels=self.class_labels,
                             train=False, **kwargs)

    def _coefficients(self, x, sigma):
        return self.precond(jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1]))

    def __call__(self, x, sigma):
        return precond_lib.apply(self._F, x, self._coefficients(x, sigma))

    def with_aux(self, x, sigma):
        aux = {}

        def F(x_in, c_noise):
            out, state = self._F(x_in, c_noise, mutable=['intermediates'])
            aux.update({name: values[-1] for name, values in state.get('intermediates', {}).items()})
            return out

        return precond_lib.apply(F, x, self._coefficients(x, sigma)), aux
