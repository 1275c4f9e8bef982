"""Mode `train`: the model trainer, `run(config, workdir)`, on the loop of `jaxdiff.drivers.loop`.

    every step: batch (the input pipeline, a background thread) -> train_step (jaxdiff.drivers.train_step)
    every log_every_steps: fetch the on-device metrics (the only host sync), log; NaN/Inf -> stop
    every checkpoint_every_steps (and on SIGTERM/SIGINT, and at the end): save items 'state' and 'ema'
    every sample_every_steps: a grid of samples from the EMA parameters (jaxdiff.drivers.sampling)

An existing workdir resumes from its newest readable checkpoint, bit-identically: the state is restored exactly,
randomness is fold_in(key, step), the data of step s is a pure function of s (jaxdiff.data), and a pool of rows
that lasts several steps (`losses.Rows.period`) is rebuilt from its index. One process trains in a workdir at a
time (a lock file names the holder). `run` is the only function here that reads the config.
"""
import os

import jax

from jaxdiff import data as data_lib
from jaxdiff.core.errors import UserError
from jaxdiff.drivers import checkpoint as checkpoint_lib
from jaxdiff.drivers import config_check, images, logger as logger_lib, loop, mesh as mesh_lib, sampling
from jaxdiff.drivers import train_step as train_step_lib
from jaxdiff.drivers import trained as trained_lib
from jaxdiff.drivers import workdir_lock


class NonFiniteLoss(UserError):
    """The loss became NaN/Inf; the message names the step and the last good checkpoint."""


def check_source(source, config):
    if tuple(source.shape) != tuple(config.data.shape):
        raise UserError(f'data.shape={tuple(config.data.shape)} but data set {config.data.name!r} has examples '
                        f'of shape {tuple(source.shape)}')


def run(config, workdir, *, source=None, devices=None):
    """Trains (or resumes) in `workdir`; returns the final TrainState. source: a data source overriding
    config.data (tests, notebooks); devices: the devices of the mesh (default: all)."""
    if not workdir:
        raise UserError('--workdir is required for --mode=train')
    config_check.check(config)
    t = config.training
    mesh_lib.initialize_distributed(**config.distributed)
    mesh = mesh_lib.make_mesh(devices)
    mesh_lib.check_batch_size(t.batch_size, mesh)
    setup = train_step_lib.build(config)
    placement = train_step_lib.parallel(setup.parallelism, mesh)
    setup.loss.check(batch_size=setup.batch_size, num_devices=placement.num_devices, parallelism=placement.name,
                     host_callbacks_in_step=placement.host_callbacks_in_step)
    source = data_lib.build(config.data) if source is None else source
    check_source(source, config)
    generator = None
    if t.sample_every_steps:
        generator = sampling.generator(config, mesh, trained_lib.denoiser_fn_for(setup.model, setup.precond))
    cadence = {'log': t.log_every_steps, loop.CHECKPOINT: t.checkpoint_every_steps,
               'sample': t.sample_every_steps if generator is not None else 0}

    is_main = jax.process_index() == 0
    with workdir_lock.hold(workdir, enabled=is_main):
        checkpoints = checkpoint_lib.Checkpoints(workdir, keep_checkpoints=t.keep_checkpoints)
        try:
            return train(setup, placement, source, checkpoints, cadence=cadence, generator=generator,
                         num_samples=config.sampling.num_samples, is_main=is_main)
        finally:
            checkpoints.wait_until_finished()
            checkpoints.close()


def train(setup, placement, source, checkpoints, *, cadence, generator=None, num_samples=0, is_main=True):
    """The model trainer: `setup` (train_step.build) placed by `placement` on the data of `source`, resumed from
    or saved to `checkpoints`; cadence {'log', 'checkpoint', 'sample': every n steps}. Returns the final
    TrainState."""
    workdir = checkpoints.workdir
    start, state = loop.restore_or_init(checkpoints, setup.abstract_state(placement.mesh),
                                        lambda: setup.init_state(placement.mesh))
    state = placement.put_state(state)
    num_params = sum(x.size for x in jax.tree.leaves(placement.get_state(state).params))
    num_devices = placement.num_devices
    print(f'training {num_params:,} parameters for steps {start}..{setup.num_steps} (batch {setup.batch_size} on '
          f'{num_devices} device{"s" if num_devices > 1 else ""}, {placement.name}) in {workdir}', flush=True)

    train_step = placement.compile(setup.train_step)
    refresher = train_step_lib.Refresher(setup, placement)
    reset_metrics = placement.jit_replicated(train_step_lib.zero_metrics)
    log = logger_lib.Logger(workdir, total_steps=setup.num_steps, batch_size=setup.batch_size, enabled=is_main)

    def step_fn(carry, step, batch):
        state, metrics = carry
        return train_step(state, metrics, refresher(step, batch))

    def on_due(carry, done, due):
        state, metrics = carry
        fetched = jax.device_get(placement.get_state(metrics))
        if fetched['first_nonfinite_step'] >= 0:
            raise NonFiniteLoss(f'loss is NaN/Inf at step {fetched["first_nonfinite_step"]}; stopped without '
                                f'saving; last good checkpoint: {_describe_latest(checkpoints)}')
        if 'log' in due:
            num = max(fetched.pop('num_steps'), 1)
            scalars = {'loss': fetched.pop('loss_sum') / num, 'learning_rate': fetched.pop('learning_rate')}
            fetched.pop('first_nonfinite_step')
            scalars.update({name: value / num for name, value in fetched.items()})
            log.progress(done, scalars)
            metrics = reset_metrics()
        if 'sample' in due:
            samples = generator(train_step_lib.ema_item(placement.get_state(state)), num_samples)
            if is_main:
                picture = images.picture(samples)
                path = images.save_picture(os.path.join(workdir, 'samples', f'step_{done:08d}.png'), picture)
                log.image('samples', picture, done)
                print(f'wrote {path}', flush=True)
        return state, metrics

    def items(carry):
        plain = placement.get_state(carry[0])
        return {'state': plain, 'ema': train_step_lib.ema_item(plain)}

    try:
        state, _ = loop.run(
            (state, reset_metrics()), start=start, num_steps=setup.num_steps, step_fn=step_fn,
            batch_fn=train_step_lib.batch_fn(setup, source, placement, start), cadence=cadence, on_due=on_due,
            checkpoints=checkpoints, items=items, max_steps_in_flight=placement.max_steps_in_flight,
            on_first_step=log.start)
    finally:
        log.close()
    return placement.get_state(state)


def _describe_latest(checkpoints):
    checkpoints.wait_until_finished()
    step = checkpoints.latest_step()
    return 'none' if step is None else os.path.join(checkpoints.directory, str(step))
