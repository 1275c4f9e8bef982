"""Mode `sample`: EMA parameters from the workdir's latest checkpoint -> config.sampling's sampler (EDM's
deterministic Heun, 18 steps, rho 7, 35 NFE by default) -> `WORKDIR/samples.npz` and `WORKDIR/samples.png`.

`Generator` is also what the training loop uses for its periodic sample grids.
"""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxdiff import checkpoint as checkpoint_lib
from jaxdiff import images, losses, mesh as mesh_lib, models, precision, samplers, schedules
from jaxdiff import train as train_lib
from jaxdiff.denoiser import Denoiser
from jaxdiff.errors import UserError


class Generator:
    """generator(params, num_samples) -> samples as a host numpy array [num_samples, *data.shape].

    config.sampling: sampler, schedule, num_steps, sigma_min, sigma_max, rho, batch_size, seed. Batch i starts from
    x_T = sigmas[0] * N(0, I) drawn from fold_in(key(seed), i) (SPEC.md), so samples do not depend on the device
    count; one compiled function serves every batch. A class-conditional model gets random class labels.
    """

    def __init__(self, config, model, precond, mesh):
        s = config.sampling
        self.sigmas = schedules.get(s.schedule, num_steps=s.num_steps, sigma_min=s.sigma_min,
                                    sigma_max=s.sigma_max, rho=s.rho)
        self.batch_size = s.batch_size
        self.nfe = None  # denoiser calls per sample, as the sampler reports it (known after the first call)
        sampler = samplers.get(s.sampler)
        shape = tuple(config.data.shape)
        label_dim = getattr(model, 'label_dim', 0)
        root_key = jax.random.key(s.seed)
        sharding = (mesh_lib.batch_sharding(mesh) if self.batch_size % mesh.devices.size == 0
                    else mesh_lib.replicated(mesh))

        def generate(params, index):
            noise_key, label_key, sampler_key = jax.random.split(jax.random.fold_in(root_key, index), 3)
            x_T = self.sigmas[0] * jax.random.normal(noise_key, (self.batch_size, *shape), jnp.float32)
            x_T = jax.lax.with_sharding_constraint(x_T, sharding)
            class_labels = None
            if label_dim:
                class_labels = jax.nn.one_hot(jax.random.randint(label_key, (self.batch_size,), 0, label_dim),
                                              label_dim)
            denoiser = Denoiser(model.apply, params, precond, class_labels=class_labels)
            x0, info = sampler(denoiser, x_T, self.sigmas, key=sampler_key)
            return x0, jnp.asarray(info['nfe'], jnp.int32)

        self._generate = jax.jit(precision.with_matmul_precision(generate, precision.from_config(config)),
                                 out_shardings=(sharding, mesh_lib.replicated(mesh)))

    def __call__(self, params, num_samples):
        batches = []
        for index in range(math.ceil(num_samples / self.batch_size)):
            x0, nfe = self._generate(params, jax.device_put(np.int32(index)))
            batches.append(np.asarray(multihost_utils.process_allgather(x0, tiled=True)))
            self.nfe = int(jax.device_get(nfe))
        return np.concatenate(batches)[:num_samples]


def restore_trained(config, workdir, mesh):
    """(model, precond, step, ema_params) of the latest training checkpoint in `workdir` (a one-line UserError naming
    the path when there is none); `Denoiser(model.apply, ema_params, precond)` is then the trained denoiser."""
    model = precision.apply_to_model(models.from_config(config), precision.from_config(config))
    precond = losses.build(**config.loss).parameterization.precond
    t = config.training
    optimizer = train_lib.make_optimizer(lr=t.lr, lr_rampup_images=t.lr_rampup_images, batch_size=t.batch_size)
    step, state = checkpoint_lib.restore_latest(workdir, train_lib.abstract_state(config, model, optimizer, mesh))
    return model, precond, step, state.ema_params


def sample(config, workdir):
    """Writes `WORKDIR/samples.npz` (samples in [-1, 1], sigmas, nfe, step) and the grid `WORKDIR/samples.png`."""
    if not workdir:
        raise UserError('--workdir is required for --mode=sample (the directory holding checkpoints/)')
    mesh_lib.initialize_distributed(**config.distributed)
    mesh = mesh_lib.make_mesh()
    model, precond, step, ema_params = restore_trained(config, workdir, mesh)
    generator = Generator(config, model, precond, mesh)
    samples = generator(ema_params, config.sampling.num_samples)
    if jax.process_index() == 0:
        npz = images.save_npz(os.path.join(workdir, 'samples.npz'), samples=samples,
                              sigmas=np.asarray(generator.sigmas), nfe=generator.nfe, step=step)
        png = images.save_png(os.path.join(workdir, 'samples.png'), samples)
        print(f'{len(samples)} samples from checkpoint step {step} ({config.sampling.sampler}, '
              f'{generator.nfe} NFE): {npz}, {png}', flush=True)
    return samples
