"""Mode `train`: the one training loop, `run(config, workdir)`.

    every step: batch (the input pipeline, a background thread) -> train_step (jaxdiff.drivers.train_step)
    every log_every_steps: fetch the on-device metrics (the only host sync), log; NaN/Inf -> stop
    every checkpoint_every_steps (and on SIGTERM/SIGINT, and at the end): save items 'state' and 'ema'
    every sample_every_steps: a grid of samples from the EMA parameters (jaxdiff.drivers.generate)

An existing workdir resumes from its newest readable checkpoint, bit-identically: the state is restored exactly,
randomness is fold_in(key, step), the data of step s is a pure function of s (jaxdiff.data), and a pool of rows
that lasts several steps (`losses.Rows.period`) is rebuilt from its index. One process trains in a workdir at a
time (a lock file names the holder).
"""
import os
import queue
import signal
import threading

import jax

from jaxdiff.drivers import checkpoint as checkpoint_lib
from jaxdiff.drivers import config_check, generate, images, logger as logger_lib, mesh as mesh_lib
from jaxdiff import data as data_lib
from jaxdiff.drivers import train_step as train_step_lib
from jaxdiff.drivers import workdir_lock
from jaxdiff.core.errors import UserError


class NonFiniteLoss(UserError):
    """The loss became NaN/Inf; the message names the step and the last good checkpoint."""


class Prefetcher:
    """Yields the batches of steps start, start+1, ... built by a background thread, `size` ahead."""

    def __init__(self, make_batch, start, stop, size=2):
        self._queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make_batch, start, stop), daemon=True)
        self._thread.start()

    def _run(self, make_batch, start, stop):
        for step in range(start, stop):
            try:
                item = make_batch(step)
            except Exception as e:  # handed to the loop, which re-raises it
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or isinstance(item, Exception):
                return

    def __next__(self):
        item = self._queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    def close(self):
        self._stop.set()
        self._thread.join()


class StopRequest:
    """SIGTERM/SIGINT set a flag that the loop checks after each step (it then saves and returns)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        print(f'received {signal.Signals(signum).name}: saving a checkpoint and stopping', flush=True)
        self.requested = True

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def check_source(source, config):
    if tuple(source.shape) != tuple(config.data.shape):
        raise UserError(f'data.shape={tuple(config.data.shape)} but data set {config.data.name!r} has examples '
                        f'of shape {tuple(source.shape)}')


class Refresher:
    """Rows that last several steps (`losses.Rows.period` > 1) go through the loss's refresh hook once per period;
    its output joins each batch of the period. Rows of period 1 pass straight to the step."""

    def __init__(self, loss, parallel, batch_size, seed, augment=None):
        self.rows = [r for r in loss.rows(batch_size) if r.period > 1]
        self.refresh = loss.hooks.refresh
        if self.rows and self.refresh is None:
            raise ValueError('a loss piece asks for rows with a period but has no refresh hook')
        self.period = self.rows[0].period if self.rows else None
        self.key = train_step_lib.refresh_key(seed)
        self.cached = None
        self.parallel = parallel
        # One process with several devices: the refresh runs on one device and its output is then split over the
        # mesh. Under the mesh, XLA:CPU deadlocks in the collectives around a host callback (the exact
        # assignment), seen with 8 CPU devices; the rows are one pool, cheap to move.
        self._one_device = None
        if parallel.name == 'jit' and jax.process_count() == 1 and parallel.mesh.devices.size > 1:
            self._one_device = parallel.mesh.devices.flat[0]
        if self.refresh is not None:
            # the output joins batches sharded on axis 0: it must come out that way (pmap: per device)
            shardings = {'out_shardings': mesh_lib.batch_sharding(parallel.mesh)} \
                if parallel.name == 'jit' and self._one_device is None else {}
            self._refresh = jax.jit(lambda rows, key: self.refresh(rows, key, augment), **shardings)

    def __call__(self, step, batch):
        if not self.rows:
            return batch
        names = [name for r in self.rows for name in (r.name, r.name + '_label')]
        if any(name in batch for name in names):
            fetched = {name: batch[name] for name in names}
            key = jax.random.fold_in(self.key, step // self.period)
            if self._one_device is None:
                self.cached = self._refresh(fetched, key)
            else:
                fetched, key = jax.device_put((fetched, key), self._one_device)
                self.cached = jax.device_put(self._refresh(fetched, key), mesh_lib.batch_sharding(self.parallel.mesh))
        batch = {name: value for name, value in batch.items() if name not in names}
        return {**batch, **self.cached}


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
    setup.loss.check(batch_size=t.batch_size, num_devices=mesh.devices.size, parallelism=setup.parallelism)
    parallel = train_step_lib.parallel(setup.parallelism, mesh)
    source = data_lib.build(config.data) if source is None else source
    check_source(source, config)

    num_steps = train_step_lib.total_steps(config)
    is_main = jax.process_index() == 0
    with workdir_lock.hold(workdir, enabled=is_main):
        checkpoints = checkpoint_lib.Checkpoints(workdir, keep_checkpoints=t.keep_checkpoints)
        state = _initial_state(config, workdir, setup, parallel, mesh, checkpoints)
        try:
            return _loop(config, workdir, setup, parallel, mesh, source, checkpoints, num_steps, is_main, state)
        finally:
            checkpoints.wait_until_finished()
            checkpoints.close()


def _initial_state(config, workdir, setup, parallel, mesh, checkpoints):
    abstract = train_step_lib.abstract_state(config, setup.modules, setup.optimizer, mesh)
    if checkpoints.latest_step() is not None:
        step, state = checkpoint_lib.restore_latest(workdir, abstract, set_aside=True)
        checkpoints.reload()
        print(f'resuming from {checkpoints.directory}/{step}', flush=True)
        return parallel.put_state(state)
    init = jax.jit(lambda key: train_step_lib.init_state(setup.modules, setup.optimizer, tuple(config.data.shape),
                                                         key), out_shardings=mesh_lib.replicated(mesh))
    return parallel.put_state(init(train_step_lib.root_keys(config.training.seed)[0]))


def _loop(config, workdir, setup, parallel, mesh, source, checkpoints, num_steps, is_main, state):
    t = config.training
    start = int(jax.device_get(parallel.get_state(state).step))
    num_params = sum(x.size for x in jax.tree.leaves(parallel.get_state(state).params))
    print(f'training {num_params:,} parameters for steps {start}..{num_steps} (batch {t.batch_size} on '
          f'{mesh.devices.size} device{"s" if mesh.devices.size > 1 else ""}, {setup.parallelism}) in {workdir}',
          flush=True)

    train_step = parallel.compile(setup.train_step)
    generator = None
    if t.sample_every_steps:
        trained_fn = generate.denoiser_fn_for(setup.model, setup.loss.parameterization.precond)
        generator = generate.Generator(config, trained_fn, mesh)
    log = logger_lib.Logger(workdir, total_steps=num_steps, batch_size=t.batch_size, enabled=is_main)
    reset_metrics = parallel.jit_replicated(train_step_lib.zero_metrics)
    metrics = reset_metrics()
    refresher = Refresher(setup.loss, parallel, t.batch_size, t.seed,
                          augment=train_step_lib.augment_fn(config.get('augment')))
    make_batch = train_step_lib.make_batch_fn(source, setup.loss, batch_size=t.batch_size, seed=t.seed,
                                              start=start, with_index=setup.parallelism == 'pmap')
    batches = Prefetcher(lambda step: parallel.put_batch(make_batch(step)), start, num_steps)
    in_flight = mesh_lib.max_steps_in_flight(mesh)
    try:
        with StopRequest() as stop:
            for step in range(start, num_steps):
                state, metrics = train_step(state, metrics, refresher(step, next(batches)))
                done = step + 1
                if step == start:
                    jax.block_until_ready(state)  # compile time stays out of images/s
                    log.start(done)
                elif in_flight and done % in_flight == 0:
                    jax.block_until_ready(state)
                stopping = stop.requested   # read once: a signal arriving later in this step waits for the next
                last = done == num_steps or stopping
                log_now = done % t.log_every_steps == 0 or last
                save_now = done % t.checkpoint_every_steps == 0 or last
                sample_now = generator is not None and (done % t.sample_every_steps == 0 or last)
                if log_now or save_now or sample_now:
                    fetched = jax.device_get(parallel.get_state(metrics))
                    if fetched['first_nonfinite_step'] >= 0:
                        raise NonFiniteLoss(f'loss is NaN/Inf at step {fetched["first_nonfinite_step"]}; stopped '
                                            f'without saving; last good checkpoint: '
                                            f'{_describe_latest(checkpoints)}')
                    if log_now:
                        num = max(fetched.pop('num_steps'), 1)
                        scalars = {'loss': fetched.pop('loss_sum') / num,
                                   'learning_rate': fetched.pop('learning_rate')}
                        fetched.pop('first_nonfinite_step')
                        scalars.update({name: value / num for name, value in fetched.items()})
                        log.progress(done, scalars)
                        metrics = reset_metrics()
                if save_now:
                    plain = parallel.get_state(state)
                    checkpoints.save(done, plain, ema=train_step_lib.ema_item(plain))
                if sample_now:
                    samples = generator(train_step_lib.ema_item(parallel.get_state(state)),
                                        config.sampling.num_samples)
                    if is_main:
                        picture = images.picture(samples)
                        path = images.save_picture(os.path.join(workdir, 'samples', f'step_{done:08d}.png'), picture)
                        log.image('samples', picture, done)
                        print(f'wrote {path}', flush=True)
                if stopping:
                    break
    finally:
        batches.close()
        log.close()
    return parallel.get_state(state)


def _describe_latest(checkpoints):
    checkpoints.wait_until_finished()
    step = checkpoints.latest_step()
    return 'none' if step is None else os.path.join(checkpoints.directory, str(step))
