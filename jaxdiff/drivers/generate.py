"""Batched, sharded sampling of any denoiser with any sampler: the one sampling loop of every mode that samples.

    generator = Generator(denoiser_fn, sampler, sigmas, sample_shape=(32, 32, 3), batch_size=500, seed=0, mesh=mesh)
    samples = generator(variables, num_samples)      # host numpy [num_samples, *sample_shape]
    generator.labels, generator.info                 # labels drawn; nfe, network_evaluations, gradient_evaluations

It knows no config and no method: `drivers/sampling.py` turns config.sampling into the sampler, the grid and the
denoiser transform. Batch i starts from x_T = sigmas[0] * N(0, I) drawn from fold_in(key(seed), i) (SPEC.md), so
samples do not depend on the device count; one compiled function serves every batch.
"""
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxdiff.drivers import mesh as mesh_lib
from jaxdiff.drivers.progress import Progress

INFO_KEYS = ('nfe', 'network_evaluations', 'gradient_evaluations')


class Transform(NamedTuple):
    """A denoiser transform as the Generator applies it:
        apply(denoiser_fn, model_variables, class_labels, variables) -> D(x, sigma)
    from the model's denoisers (denoiser_fn(model_variables, labels) -> D, so a transform may evaluate the model
    under other labels, e.g. the null label) and its own `variables` (the arrays it needs, e.g. another network's
    parameters), which reach the compiled function as arguments, not as constants folded into it."""
    apply: Callable
    variables: Any = None


class Generator:
    """generator(variables, num_samples, first_batch=0) -> samples as a host numpy array [num_samples, *sample_shape].

    denoiser_fn(variables, class_labels) -> D(x, sigma); sampler: a SPEC sampler; sigmas: its grid.
    label_dim > 0: class_labels are one-hot rows of class_label, or of random labels when it is None.
    transform: a `Transform` applied to every batch's denoiser. matmul_precision(fn) -> fn: the run's precision
    policy (drivers/precision.py). progress: a name, to show a progress line while sampling more than one batch.
    After a call, self.labels holds the labels and self.info the sampler's nfe and the network and gradient
    evaluations per sample it counted.
    """

    def __init__(self, denoiser_fn, sampler, sigmas, *, sample_shape, batch_size, seed, mesh, label_dim=0,
                 class_label=None, transform: Optional[Transform] = None, matmul_precision=None, progress=None):
        if class_label is not None and not 0 <= int(class_label) < max(label_dim, 1):
            raise ValueError(f'class_label={class_label} is not a class of a model with label_dim={label_dim}')
        self.sampler, self.sigmas, self.batch_size, self.progress = sampler, sigmas, batch_size, progress
        self.transform = transform
        self.labels, self.info = None, {}
        root_key = jax.random.key(seed)
        sharding = (mesh_lib.batch_sharding(mesh) if batch_size % mesh.devices.size == 0
                    else mesh_lib.replicated(mesh))

        def generate(variables, transform_variables, index):
            noise_key, label_key, sampler_key = jax.random.split(jax.random.fold_in(root_key, index), 3)
            x_T = sigmas[0] * jax.random.normal(noise_key, (batch_size, *sample_shape), jnp.float32)
            x_T = jax.lax.with_sharding_constraint(x_T, sharding)
            labels = jnp.zeros((batch_size,), jnp.int32)
            class_labels = None
            if label_dim:
                labels = (jnp.full((batch_size,), int(class_label), jnp.int32) if class_label is not None
                          else jax.random.randint(label_key, (batch_size,), 0, label_dim))
                class_labels = jax.nn.one_hot(labels, label_dim)
            if transform is None:
                denoiser = denoiser_fn(variables, class_labels)
            else:
                denoiser = transform.apply(denoiser_fn, variables, class_labels, transform_variables)
            x0, info = sampler(denoiser, x_T, sigmas, key=sampler_key)
            counts = {name: jnp.asarray(info.get(name, -1), jnp.int32) for name in INFO_KEYS}
            return x0, labels, counts

        if matmul_precision is not None:
            generate = matmul_precision(generate)
        replicated = mesh_lib.replicated(mesh)
        self._generate = jax.jit(generate, out_shardings=(sharding, sharding, {name: replicated for name in INFO_KEYS}))

    @property
    def nfe(self):
        return self.info.get('nfe')

    def __call__(self, variables, num_samples, *, first_batch=0):
        """num_samples samples from batches first_batch, first_batch + 1, ...; their labels in self.labels."""
        batches, labels = [], []
        num_batches = math.ceil(num_samples / self.batch_size)
        progress = Progress(self.progress, total=num_samples, unit='samples',
                            enabled=bool(self.progress) and num_batches > 1 and jax.process_index() == 0)
        transform_variables = None if self.transform is None else self.transform.variables
        for index in range(first_batch, first_batch + num_batches):
            x0, label, counts = self._generate(variables, transform_variables, jax.device_put(np.int32(index)))
            batches.append(np.asarray(multihost_utils.process_allgather(x0, tiled=True)))
            labels.append(np.asarray(multihost_utils.process_allgather(label, tiled=True)))
            self.info = {name: int(value) for name, value in jax.device_get(counts).items() if int(value) >= 0}
            progress.update(min(self.batch_size, num_samples - progress.count))
        progress.close()
        self.labels = np.concatenate(labels)[:num_samples]
        return np.concatenate(batches)[:num_samples]
