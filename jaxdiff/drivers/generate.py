"""Batched sampling of a trained denoiser: what every mode that samples uses (train's sample grids, sample,
evaluate, AMED and discriminator training).

    trained = restore(config, workdir, mesh)          # the EMA item of the newest readable checkpoint only
    sampler, sigmas = sampler_from_config(config.sampling)
    generator = Generator(config, trained.denoiser_fn, mesh)
    samples = generator(trained.variables, num_samples)

config.sampling (SPEC.md): sampler, sampler_options (keyword arguments of `samplers.get`), schedule,
schedule_options (of `schedules.get`), predictor_workdir (an AMED predictor: its saved settings fix the sampler
options and the grid), num_samples, batch_size, seed, class_label (None: random labels for a conditional model).
"""
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxdiff.drivers import checkpoint as checkpoint_lib
from jaxdiff.drivers import discriminator_training, mesh as mesh_lib, precision
from jaxdiff.core import losses, samplers, schedules
from jaxdiff import models
from jaxdiff.drivers import train_step
from jaxdiff.models.denoiser import Denoiser
from jaxdiff.core.errors import UserError
from jaxdiff.drivers.progress import Progress


def _options(section, name):
    value = section.get(name) or {}
    return dict(value)


def sampler_from_config(sampling):
    """(sampler, sigmas) named by config.sampling; an unknown sampler, schedule or option is a one-line error
    naming it and the valid ones."""
    predictor_workdir = sampling.get('predictor_workdir')
    if predictor_workdir:
        from jaxdiff.drivers import amed_train   # the predictor's file format
        if sampling.sampler != 'amed':
            raise UserError(f'config.sampling.predictor_workdir is an AMED predictor; set '
                            f'config.sampling.sampler=amed (got {sampling.sampler!r})')
        sampler, sigmas, _ = amed_train.load_sampler(predictor_workdir)
        return sampler, sigmas
    try:
        sampler = samplers.get(sampling.sampler, **_options(sampling, 'sampler_options'))
    except ValueError as e:
        raise UserError(f'config.sampling: {e}') from e
    try:
        sigmas = schedules.get(sampling.schedule, **_options(sampling, 'schedule_options'))
    except ValueError as e:
        raise UserError(f'config.sampling: {e}') from e
    return sampler, sigmas


class Trained(NamedTuple):
    """A trained network as something to sample: denoiser_fn(variables, class_labels) -> D(x, sigma)."""
    model: Any
    precond: Callable
    step: int
    variables: Any        # the EMA item: {'params': {'model': ...}, 'model_state': ...}
    denoiser_fn: Callable


def denoiser_fn_for(model, precond):
    """(variables, class_labels) -> the SPEC denoiser of the EMA item `variables`."""
    def denoiser_fn(variables, class_labels=None):
        return Denoiser(model.apply, variables['params']['model'], precond, class_labels=class_labels,
                        buffers=variables['model_state'])
    return denoiser_fn


def networks_of(config):
    """(model, modules, precond): the config's networks (with its precision policy) and preconditioning."""
    model = precision.apply_to_model(models.from_config(config), precision.from_config(config))
    loss = losses.build(**config.loss)
    modules = {'model': model, **{name: models.from_config(config, section=name)
                                  for name in loss.hooks.extra_networks}}
    return model, modules, loss.parameterization.precond


def restore(config, workdir, mesh):
    """The EMA item of the newest readable checkpoint in `workdir` (no optimizer is built), as a `Trained`."""
    model, modules, precond = networks_of(config)
    step, variables = checkpoint_lib.restore_latest(workdir, train_step.abstract_ema(config, modules, mesh),
                                                    item='ema')
    return Trained(model, precond, step, variables, denoiser_fn_for(model, precond))


class Generator:
    """generator(variables, num_samples) -> samples as a host numpy array [num_samples, *data.shape].

    Batch i starts from x_T = sigmas[0] * N(0, I) drawn from fold_in(key(seed), i) (SPEC.md), so samples do not
    depend on the device count; one compiled function serves every batch. A class-conditional model gets
    config.sampling.class_label, or random labels when it is None. `wrap(denoiser) -> denoiser` (e.g. guidance)
    is applied to the model's denoiser. progress: a name, to show a progress line (jaxdiff.drivers.progress) while
    sampling more than one batch.
    """

    def __init__(self, config, denoiser_fn, mesh, *, wrap=None, progress=None):
        s = config.sampling
        self.sampler, self.sigmas = sampler_from_config(s)
        if wrap is None:   # config.sampling.guidance: discriminator guidance (and its sampler), or nothing
            wrap, self.sampler = discriminator_training.guidance_from_config(config, mesh, self.sampler, self.sigmas)
        self.guidance_calls = None   # discriminator-gradient calls per sample, when the sampler reports them
        self.batch_size = s.batch_size
        self.nfe = None  # denoiser calls per sample, as the sampler reports it (known after the first call)
        self.progress = progress
        shape = tuple(config.data.shape)
        label_dim = int(config.model.get('label_dim', 0) or 0)
        class_label = s.get('class_label')
        if class_label is not None and not 0 <= int(class_label) < max(label_dim, 1):
            raise UserError(f'config.sampling.class_label={class_label} is not a class of this model '
                            f'(model.label_dim={label_dim})')
        root_key = jax.random.key(s.seed)
        sharding = (mesh_lib.batch_sharding(mesh) if self.batch_size % mesh.devices.size == 0
                    else mesh_lib.replicated(mesh))
        sampler, sigmas = self.sampler, self.sigmas

        def generate(variables, index):
            noise_key, label_key, sampler_key = jax.random.split(jax.random.fold_in(root_key, index), 3)
            x_T = sigmas[0] * jax.random.normal(noise_key, (self.batch_size, *shape), jnp.float32)
            x_T = jax.lax.with_sharding_constraint(x_T, sharding)
            labels = class_labels = None
            if label_dim:
                labels = (jnp.full((self.batch_size,), int(class_label), jnp.int32) if class_label is not None
                          else jax.random.randint(label_key, (self.batch_size,), 0, label_dim))
                class_labels = jax.nn.one_hot(labels, label_dim)
            denoiser = denoiser_fn(variables, class_labels)
            if wrap is not None:
                denoiser = wrap(denoiser, variables, class_labels)
            x0, info = sampler(denoiser, x_T, sigmas, key=sampler_key)
            labels = jnp.zeros((self.batch_size,), jnp.int32) if labels is None else labels
            return x0, labels, jnp.asarray(info['nfe'], jnp.int32), jnp.asarray(info.get('guidance_calls', -1),
                                                                                jnp.int32)

        self._generate = jax.jit(precision.with_matmul_precision(generate, precision.from_config(config)),
                                 out_shardings=(sharding, sharding, mesh_lib.replicated(mesh),
                                                mesh_lib.replicated(mesh)))
        self.labels = None

    def __call__(self, variables, num_samples, *, first_batch=0):
        """num_samples samples from batches first_batch, first_batch + 1, ...; their labels in self.labels."""
        batches, labels = [], []
        num_batches = math.ceil(num_samples / self.batch_size)
        progress = Progress(self.progress, total=num_samples, unit='samples',
                            enabled=bool(self.progress) and num_batches > 1 and jax.process_index() == 0)
        for index in range(first_batch, first_batch + num_batches):
            x0, label, nfe, guidance_calls = self._generate(variables, jax.device_put(np.int32(index)))
            batches.append(np.asarray(multihost_utils.process_allgather(x0, tiled=True)))
            labels.append(np.asarray(multihost_utils.process_allgather(label, tiled=True)))
            self.nfe = int(jax.device_get(nfe))
            calls = int(jax.device_get(guidance_calls))
            self.guidance_calls = calls if calls >= 0 else None
            progress.update(min(self.batch_size, num_samples - progress.count))
        progress.close()
        self.labels = np.concatenate(labels)[:num_samples]
        return np.concatenate(batches)[:num_samples]
