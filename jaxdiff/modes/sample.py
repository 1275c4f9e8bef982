"""Mode `sample`: the EMA item of the workdir's newest readable checkpoint -> config.sampling's sampler, grid and
guidance (EDM's deterministic Heun, 18 steps, rho 7, 35 NFE by default; any sampler, schedule, option and
registered transform by config) -> `WORKDIR/samples.npz` and `WORKDIR/samples.png`.

    python -m jaxdiff.main --config=configs/toy2d_edm.py --workdir=W --mode=sample \
        --config.sampling.sampler=dpmpp_2m --config.sampling.schedule=logsnr
"""
import os

import jax
import numpy as np

from jaxdiff.core.errors import UserError
from jaxdiff.drivers import config_check, images, mesh as mesh_lib, sampling, trained as trained_lib


def run(config, workdir):
    """Writes `WORKDIR/samples.npz` (samples in [-1, 1], labels, sigmas, nfe, network and gradient evaluations,
    step) and the grid `samples.png`."""
    if not workdir:
        raise UserError('--workdir is required for --mode=sample (the directory holding checkpoints/)')
    config_check.check_sampling(config)
    mesh_lib.initialize_distributed(**config.distributed)
    sampling.check(config)    # a bad sampler option fails before the checkpoint is read
    mesh = mesh_lib.make_mesh()
    trained = trained_lib.restore(config, workdir, mesh)
    generator = sampling.generator(config, mesh, trained.denoiser_fn, progress='sampling')
    samples = generator(trained.variables, config.sampling.num_samples)
    if jax.process_index() == 0:
        npz = images.save_npz(os.path.join(workdir, 'samples.npz'), samples=samples, labels=generator.labels,
                              sigmas=np.asarray(generator.sigmas), step=trained.step, **generator.info)
        png = images.save_png(os.path.join(workdir, 'samples.png'), samples)
        print(f'{len(samples)} samples from checkpoint step {trained.step} ({generator.sampler.name}, '
              f'{sampling.describe(generator.info)}): {npz}, {png}', flush=True)
    return samples
