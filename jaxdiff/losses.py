"""The denoising loss, assembled from three swappable pieces chosen by name (config.loss):

  parameterization  how sigma is drawn for training, how the network is preconditioned and weighted
                    (EDM / VP / VE, EDM Table 1; see precond.py)
  target            what D(x_noisy, sigma) regresses to: `target(x_noisy, sigma, batch) -> y_target`
                    ('x0': the clean image itself; 'stf': the stable target field over batch['reference'])
  pairing           which noise goes with which clean image: `pairing(key, y) -> eps` ('independent': i.i.d. N(0, I))

  loss(params, batch, key) = mean[ lambda(sigma) * (D(y + sigma eps, sigma) - target)^2 ]      (EDM eq. 8)

EDM sums the squared error over pixels; we average over pixels too, a constant factor that Adam's update is invariant
to (up to its epsilon) and that keeps the logged loss comparable across image sizes. Pure: no Flax, no config objects.
A new piece is a factory added to one of the three registries below; its keyword options come from config.loss.
"""
import functools
import inspect
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff import precond, stf
from jaxdiff.precond import per_example


class Parameterization(NamedTuple):
    precond: Callable        # sigma -> precond.Coefficients
    weight: Callable         # sigma -> lambda(sigma)
    sample_sigma: Callable   # (key, shape) -> sigma ~ p_train


def edm_parameterization(*, sigma_data=0.5, P_mean=-1.2, P_std=1.2):
    """EDM: log-normal sigma, EDM preconditioning and weight (EDM Table 1)."""
    return Parameterization(precond=functools.partial(precond.edm, sigma_data=sigma_data),
                            weight=functools.partial(precond.edm_weight, sigma_data=sigma_data),
                            sample_sigma=functools.partial(precond.edm_sigma, P_mean=P_mean, P_std=P_std))


def vp_parameterization(*, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5, M=1000):
    """VP (DDPM++ of Song et al. 2021) in EDM's formulation (EDM Table 1, VP column)."""
    return Parameterization(precond=functools.partial(precond.vp, beta_d=beta_d, beta_min=beta_min, M=M),
                            weight=precond.vp_weight,
                            sample_sigma=functools.partial(precond.vp_sigma, beta_d=beta_d, beta_min=beta_min,
                                                           epsilon_t=epsilon_t))


def ve_parameterization(*, sigma_min=0.02, sigma_max=100.0):
    """VE (NCSN++ of Song et al. 2021) in EDM's formulation (EDM Table 1, VE column)."""
    return Parameterization(precond=precond.ve, weight=precond.ve_weight,
                            sample_sigma=functools.partial(precond.ve_sigma, sigma_min=sigma_min,
                                                           sigma_max=sigma_max))


def x0_target(x_noisy, sigma, batch):
    """The plain denoising target: the clean image y itself (EDM eq. 2)."""
    del x_noisy, sigma
    return batch['image']


def stf_target(*, reference_size=None, reference_chunk_size=None):
    """The stable target field (Xu et al. 2023, Eq. 3; `jaxdiff.stf.target`): sum_j softmax_j(-|x - y_j|^2 /
    (2 sigma^2)) y_j over batch['reference'] [R, ...] (the minibatch's clean images, then R - B others; the train
    step assembles it). It is an x0-space target, so EDM, VP and VE all regress D to it unchanged. Under jit the
    arrays are global: every sample sees all R images however the batch is sharded. No gradient flows into it."""
    if reference_size is None:
        raise ValueError("loss.target='stf' needs loss.reference_size (R, the global reference batch size)")

    def target(x_noisy, sigma, batch):
        reference = batch.get('reference', batch['image'])      # absent when R = B: the minibatch alone
        return stf.target(x_noisy, sigma, reference, chunk_size=reference_chunk_size)
    return target


def independent_pairing(key, y):
    """Noise drawn i.i.d. N(0, I), independent of the clean images y."""
    return jax.random.normal(key, y.shape, y.dtype)


# Registries: name -> factory(**options) -> piece. Other modules add entries (e.g. 'stf', an OT pairing).
PARAMETERIZATIONS = {'edm': edm_parameterization, 'vp': vp_parameterization, 've': ve_parameterization}
TARGETS = {'x0': lambda: x0_target, 'stf': stf_target}
PAIRINGS = {'independent': lambda: independent_pairing}


class Pieces(NamedTuple):
    parameterization: Parameterization
    target: Callable
    pairing: Callable


def _options_of(factory):
    return {p.name for p in inspect.signature(factory).parameters.values() if p.kind == p.KEYWORD_ONLY}


def _choose(registry, kind, name):
    if name not in registry:
        raise ValueError(f'unknown loss.{kind} {name!r}; valid choices: {", ".join(sorted(registry))}')
    return registry[name]


def build(*, parameterization='edm', target='x0', pairing='independent', **options):
    """The three pieces named by config.loss, each built with the options its factory takes.

    An option that no registered piece accepts is a typo and raises ValueError; an option that belongs to another
    choice (e.g. P_mean when parameterization='vp') is ignored, so one config can switch pieces from the command line.
    """
    chosen = {'parameterization': _choose(PARAMETERIZATIONS, 'parameterization', parameterization),
              'target': _choose(TARGETS, 'target', target),
              'pairing': _choose(PAIRINGS, 'pairing', pairing)}
    known = set().union(*(_options_of(f) for registry in (PARAMETERIZATIONS, TARGETS, PAIRINGS)
                          for f in registry.values()))
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f'unknown loss option(s) {", ".join(unknown)}; valid options: {", ".join(sorted(known))}')
    return Pieces(**{kind: factory(**{k: v for k, v in options.items() if k in _options_of(factory)})
                     for kind, factory in chosen.items()})


def make_loss(network, pieces: Pieces):
    """loss(params, batch, key) -> scalar, the weighted denoising loss (EDM eq. 8).

    network(params, x_in, c_noise, batch, key) -> F: the raw network on preconditioned input; it reads whatever
    conditioning it needs from the batch (class labels, augmentation labels) and draws dropout from key.
    batch['image'] holds the clean (augmented) images y, [B, ...].
    """
    def loss(params, batch, key):
        y = batch['image']
        sigma_key, noise_key, network_key = jax.random.split(key, 3)
        sigma = pieces.parameterization.sample_sigma(sigma_key, y.shape[:1])
        eps = pieces.pairing(noise_key, y)
        x_noisy = y + per_example(sigma, y) * eps
        F = lambda x_in, c_noise: network(params, x_in, c_noise, batch, network_key)
        D = precond.apply(F, x_noisy, pieces.parameterization.precond(sigma))
        weight = pieces.parameterization.weight(sigma)
        y_target = pieces.target(x_noisy, sigma, batch)
        return jnp.mean(per_example(weight, y) * (D - y_target) ** 2)
    return loss
