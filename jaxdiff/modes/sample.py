"""Mode `sample`: the EMA item of the workdir's newest readable checkpoint -> config.sampling's sampler and grid
(EDM's deterministic Heun, 18 steps, rho 7, 35 NFE by default; any sampler, schedule and option by config) ->
`WORKDIR/samples.npz` and `WORKDIR/samples.png`.

    python -m jaxdiff.main --config=configs/toy2d_edm.py --workdir=W --mode=sample \
        --config.sampling.sampler=dpmpp_2m --config.sampling.schedule=logsnr
"""
import os

import jax
import numpy as np

from jaxdiff.drivers import config_check, generate, images, mesh as mesh_lib
from jaxdiff.core.errors import UserError


def run(config, workdir):
    """Writes `WORKDIR/samples.npz` (samples in [-1, 1], labels, sigmas, nfe, step) and the grid `samples.png`."""
    if not workdir:
        raise UserError('--workdir is required for --mode=sample (the directory holding checkpoints/)')
    config_check.check_sampling(config)
    mesh_lib.initialize_distributed(**config.distributed)
    mesh = mesh_lib.make_mesh()
    generate.sampler_from_config(config.sampling)    # a bad sampler option fails before the checkpoint is read
    trained = generate.restore(config, workdir, mesh)
    generator = generate.Generator(config, trained.denoiser_fn, mesh, progress='sampling')
    samples = generator(trained.variables, config.sampling.num_samples)
    if jax.process_index() == 0:
        npz = images.save_npz(os.path.join(workdir, 'samples.npz'), samples=samples, labels=generator.labels,
                              sigmas=np.asarray(generator.sigmas), nfe=generator.nfe, step=trained.step)
        png = images.save_png(os.path.join(workdir, 'samples.png'), samples)
        guided = '' if generator.guidance_calls is None else (
            f', {generator.guidance_calls} discriminator-gradient calls')
        print(f'{len(samples)} samples from checkpoint step {trained.step} ({config.sampling.sampler}, '
              f'{generator.nfe} NFE{guided}): {npz}, {png}', flush=True)
    return samples
