"""Discriminator guidance from a trained discriminator's workdir: the 'discriminator' entry of the sampling
transforms (drivers/sampling.py), beside the pure transform `guidance.discriminator_guided`.

    config.sampling.guidance = dict(name='discriminator', discriminator_workdir=W, weight=2.0, sigma_min=0.0447,
                                    sigma_max=inf, first_evaluation_only=True, boosting=False)

The guided denoiser is D + weight sigma^2 grad_x log r inside [sigma_min, sigma_max] (Kim et al. 2023, Theorem 1);
with EDM's Heun and first_evaluation_only or boosting the sampler becomes 'heun_dg' (the authors' sampler: the
first evaluation of each step guided); every other sampler runs on the guided denoiser at each of its evaluations.
The samplers count the gradient evaluations they make (info['gradient_evaluations']).
"""
import json
import os
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxdiff.core import guidance, precond, samplers
from jaxdiff.core.errors import UserError
from jaxdiff.drivers import checkpoint as checkpoint_lib
from jaxdiff.drivers import discriminator_training, generate, mesh as mesh_lib
from jaxdiff.models import discriminator as discriminator_lib

# NumPy in (precond's rule): a module import must not start JAX's backend (jax.distributed.initialize comes later)
DEFAULTS = dict(discriminator_workdir=None, weight=2.0, sigma_min=float(precond.vp_sigma_of_t(np.float64(0.01))),
                sigma_max=float('inf'), first_evaluation_only=True, boosting=False)


class TrainedDiscriminator(NamedTuple):
    discriminator: Any        # discriminator_training.Discriminator
    params: Any
    step: int
    settings: dict

    def logit_fn(self, denoiser, class_labels=None, *, params=None):
        """log r(x, sigma) -> [B] for guidance.discriminator_guided: the logit of d clipped as the authors clip d to
        [1e-5, 1 - 1e-5] (`guidance.clipped_log_ratio`: a saturated discriminator adds no gradient), the features
        read from `denoiser` (the model being guided) when the discriminator was trained on them. params: the
        discriminator's parameters as the compiled function receives them (default: self.params)."""
        features = self.discriminator.features == 'bottleneck'
        features_fn = discriminator_training.bottleneck_features(denoiser) if features else None
        logit_fn = discriminator_lib.make_logit_fn(self.discriminator.network.apply,
                                                   self.params if params is None else params, features_fn,
                                                   class_labels if self.discriminator.label_dim else None)
        return lambda x, sigma: guidance.clipped_log_ratio(logit_fn(x, sigma))


def restore(workdir, mesh):
    """The discriminator of `workdir` (discriminator.json + the 'ema' item of its newest readable checkpoint)."""
    path = os.path.join(workdir, discriminator_training.SETTINGS_FILE)
    if not os.path.exists(path):
        raise UserError(f'no trained discriminator in {workdir}: {path} does not exist (run --mode='
                        'train_discriminator with this --workdir first)')
    with open(path) as f:
        settings = json.load(f)
    discriminator = discriminator_training.discriminator_of(settings)
    shapes = jax.eval_shape(lambda key: discriminator.init(key, tuple(settings['input_shape'])), jax.random.key(0))
    abstract = checkpoint_lib.abstract_like(discriminator_training.sampling_item(shapes), mesh_lib.replicated(mesh))
    step, item = checkpoint_lib.restore_latest(workdir, abstract, item='ema')
    return TrainedDiscriminator(discriminator, item['params']['discriminator'], step, settings)


def guided_sampler(sampler, *, first_evaluation_only, boosting, weight):
    """The sampler guidance runs with: EDM's Heun becomes 'heun_dg' when the guidance asks for the first
    evaluation only or boosting (and the weight is not 0), with Heun's options; 'heun_dg' takes them as defaults of
    its options; any other sampler is returned as it is (guided at every evaluation; boosting is Heun's only)."""
    name = getattr(sampler, 'name', None)
    options = dict(getattr(sampler, 'options', {}))
    special = dict(first_evaluation_only=first_evaluation_only, boosting=boosting)
    if name == 'heun_dg':
        return samplers.get('heun_dg', **{**options, **special})
    if name == 'heun' and weight != 0 and (first_evaluation_only or boosting):
        unsupported = sorted(k for k in ('afs', 'denoise_to_zero') if options.get(k))
        if unsupported:
            raise UserError(f'config.sampling.sampler_options.{unsupported[0]}: the guided Heun (heun_dg) has no '
                            'such option; set config.sampling.guidance.first_evaluation_only=False to guide '
                            'plain Heun at both evaluations')
        return samplers.get('heun_dg', **{k: v for k, v in options.items() if k not in ('afs', 'denoise_to_zero')},
                            **special)
    if boosting:
        raise UserError(f'config.sampling.guidance.boosting=True needs sampler heun or heun_dg (got {name!r})')
    return sampler


def build(config, mesh, sampler, *, discriminator_workdir=DEFAULTS['discriminator_workdir'],
          weight=DEFAULTS['weight'], sigma_min=DEFAULTS['sigma_min'], sigma_max=DEFAULTS['sigma_max'],
          first_evaluation_only=DEFAULTS['first_evaluation_only'], boosting=DEFAULTS['boosting']):
    """(Transform, sampler) of discriminator guidance; (None, sampler) while no discriminator_workdir is set (the
    recipes' sections are off until one is named on the command line)."""
    del config
    if not discriminator_workdir:
        return None, sampler
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise UserError(f'config.sampling.guidance.weight={weight!r} must be a number')
    if not 0 <= sigma_min <= sigma_max:
        raise UserError(f'config.sampling.guidance.sigma_min={sigma_min!r} and sigma_max={sigma_max!r} must satisfy '
                        '0 <= sigma_min <= sigma_max')
    for field, value in dict(first_evaluation_only=first_evaluation_only, boosting=boosting).items():
        if not isinstance(value, bool):
            raise UserError(f'config.sampling.guidance.{field}={value!r} must be True or False')
    trained = restore(discriminator_workdir, mesh)
    weight, sigma_min, sigma_max = float(weight), float(sigma_min), float(sigma_max)

    def apply(denoiser_fn, model_variables, class_labels, params):
        denoiser = denoiser_fn(model_variables, class_labels)
        return guidance.discriminator_guided(denoiser, trained.logit_fn(denoiser, class_labels, params=params),
                                             weight=weight, sigma_min=sigma_min, sigma_max=sigma_max)

    sampler = guided_sampler(sampler, first_evaluation_only=first_evaluation_only, boosting=boosting, weight=weight)
    return generate.Transform(apply, trained.params), sampler
