"""Mode `train_discriminator`: the discriminator of discriminator guidance for a trained model
(jaxdiff.drivers.discriminator_training).

    python -m jaxdiff.main --config=configs/toy2d_dg.py --mode=train_discriminator --workdir=runs/toy2d_dg_disc \
        --config.discriminator.model_workdir=runs/toy2d_dg

Reads only the EMA item of config.discriminator.model_workdir's newest readable checkpoint; generates
num_generated + num_heldout unguided samples with config.sampling (or reuses WORKDIR/generated.npz, or the npz of
config.discriminator.generated_path), then trains real vs generated, checkpointing, resuming and stopping on
SIGTERM like training. Guided sampling then reads the workdir: --config.sampling.guidance.discriminator_workdir=WORKDIR.
"""
import os

import jax

from jaxdiff import data as data_lib
from jaxdiff.core.errors import UserError
from jaxdiff.drivers import config_check, discriminator_training, images, mesh as mesh_lib, sampling
from jaxdiff.drivers import trained as trained_lib
from jaxdiff.drivers import workdir_lock


def generated_samples(config, workdir, trained, mesh, settings):
    """{'image', 'label'} of num_generated + num_heldout unguided samples (the discriminator learns the model's own
    samples): read from the npz, or generated and written to WORKDIR/generated.npz."""
    num = settings['num_generated'] + settings['num_heldout']
    path = settings['generated_path'] or os.path.join(workdir, discriminator_training.GENERATED_FILE)
    rows = discriminator_training.load_generated(path, num)
    if rows is not None:
        print(f'reusing {num} generated samples from {path}', flush=True)
        return rows
    if settings['generated_path']:
        raise UserError(f'config.discriminator.generated_path={path} does not exist')
    generator = sampling.generator(config, mesh, trained.denoiser_fn, guided=False, progress='generating')
    samples = generator(trained.variables, num)
    if jax.process_index() == 0:
        images.save_npz(path, samples=samples, labels=generator.labels, step=trained.step, nfe=generator.nfe)
        print(f'{num} samples of checkpoint step {trained.step} ({config.sampling.sampler}, {generator.nfe} NFE): '
              f'{path}', flush=True)
    return {'image': samples, 'label': generator.labels}


def run(config, workdir, *, source=None, devices=None):
    """Trains (or resumes) the discriminator in `workdir`; returns its final state. source: a data source
    overriding config.data (tests); devices: the mesh's devices (default: all)."""
    if not workdir:
        raise UserError('--workdir is required for --mode=train_discriminator (where the discriminator goes)')
    settings = discriminator_training.settings_of(config)
    if not settings['model_workdir']:
        raise UserError('config.discriminator.model_workdir must name the trained model\'s workdir (its '
                        'checkpoints/)')
    config_check.check_sampling(config)
    mesh_lib.initialize_distributed(**config.distributed)
    mesh = mesh_lib.make_mesh(devices)
    trained = trained_lib.restore(config, settings['model_workdir'], mesh)
    source = data_lib.build(config.data) if source is None else source
    with workdir_lock.hold(workdir, enabled=jax.process_index() == 0):
        rows = generated_samples(config, workdir, trained, mesh, settings)
        split = settings['num_generated']
        heldout = {'real': discriminator_training.heldout_real(config.data, source, settings['num_heldout']),
                   'generated': {name: value[split:] for name, value in rows.items()}}
        return discriminator_training.train(
            config, workdir, real_source=source, heldout=heldout,
            generated={name: value[:split] for name, value in rows.items()}, frozen=trained.variables,
            denoiser_fn=trained.denoiser_fn, mesh=mesh, model_step=trained.step)
