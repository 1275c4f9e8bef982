"""The training loop (mode `train`): `train(config, workdir)`.

    state = (step, params, ema_params, opt_state), replicated over Mesh('data'); each batch sharded over it.
    step s: key = fold_in(base_key, s); augment; loss(params, batch, key) -> grads -> Adam (EDM lr ramp) -> EMA
    every log_every_steps: fetch the on-device metrics (the only host sync), log; NaN/Inf -> stop
    every checkpoint_every_steps (and on SIGTERM/SIGINT, and at the end): save; an existing workdir resumes

A resumed run is bit-identical to an uninterrupted one: the state is restored exactly, randomness is
fold_in(key, step) and the data of step s is a pure function of s (jaxdiff.data). Hyper-parameters follow EDM's
training_loop.py (Karras et al. 2022, App. F.2); config fields have the names of the arguments they feed.
"""
import math
import os
import queue
import signal
import threading
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxdiff import augment as augment_lib
from jaxdiff import checkpoint as checkpoint_lib
from jaxdiff import data as data_lib
from jaxdiff import images, logger as logger_lib, losses, mesh as mesh_lib, models, precision
from jaxdiff.errors import UserError


class TrainState(NamedTuple):
    step: Any          # int32 scalar: optimizer steps taken
    params: Any
    ema_params: Any
    opt_state: Any


class NonFiniteLoss(UserError):
    """The loss became NaN/Inf; the message names the step and the last good checkpoint."""


# ---------------------------------------------------------------- EDM's schedules (training_loop.py)

def learning_rate(step, *, lr, lr_rampup_images, batch_size):
    """lr * min(images / lr_rampup_images, 1), images = step * batch_size seen before this step (EDM App. F.2)."""
    return lr * jnp.minimum(step * batch_size / max(lr_rampup_images, 1e-8), 1.0)


def ema_beta(step, *, batch_size, ema_halflife_images, ema_rampup_ratio):
    """beta = 0.5 ** (batch_size / halflife), halflife = min(ema_halflife_images, images * ema_rampup_ratio)
    (EDM training_loop.py: the EMA half-life, in images, ramps up with the images seen)."""
    halflife = ema_halflife_images
    if ema_rampup_ratio is not None:
        halflife = jnp.minimum(halflife, step * batch_size * ema_rampup_ratio)
    return 0.5 ** (batch_size / jnp.maximum(halflife, 1e-8))


def make_optimizer(*, lr, lr_rampup_images, batch_size):
    """Adam (beta1 0.9, beta2 0.999, eps 1e-8) with EDM's linear ramp; optax's step count starts at 0, so the
    first update has lr 0, as in EDM."""
    schedule = lambda count: learning_rate(count, lr=lr, lr_rampup_images=lr_rampup_images, batch_size=batch_size)
    return optax.adam(schedule, b1=0.9, b2=0.999, eps=1e-8)


# ---------------------------------------------------------------- the pieces of one step

def init_state(model, optimizer, data_shape, key):
    """Fresh parameters (EMA = a copy) and optimizer state."""
    params = model.init(key, jnp.zeros((1, *data_shape), jnp.float32), jnp.zeros((1,), jnp.float32))['params']
    # the EMA gets its own buffers: the step donates both trees, and one buffer must not be donated twice
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=jax.tree.map(jnp.copy, params),
                      opt_state=optimizer.init(params))


def make_network(model):
    """network(params, x_in, c_noise, batch, key) -> F for the loss: class labels (one-hot) and augmentation
    labels come from the batch, dropout from key."""
    label_dim = getattr(model, 'label_dim', 0)

    def network(params, x_in, c_noise, batch, key):
        class_labels = jax.nn.one_hot(batch['label'], label_dim) if label_dim else None
        return model.apply({'params': params}, x_in, c_noise, class_labels=class_labels,
                           augment_labels=batch.get('augment_labels'), train=True, rngs={'dropout': key})
    return network


def augment_options(data_config):
    """jaxdiff.augment keywords from config.data: augment_p -> p, augment_NAME -> NAME; None when augment_p is 0."""
    fields = dict(data_config)
    if not fields.get('augment_p'):
        return None
    options = {name[len('augment_'):]: value for name, value in fields.items() if name.startswith('augment_')}
    options['p'] = options.pop('p')
    return options


def zero_metrics():
    """On-device accumulators, fetched only every log_every_steps (no host sync inside the loop)."""
    return {'loss_sum': jnp.zeros((), jnp.float32), 'num_steps': jnp.zeros((), jnp.int32),
            'first_nonfinite_step': jnp.full((), -1, jnp.int32), 'learning_rate': jnp.zeros((), jnp.float32)}


def root_keys(seed):
    """(init_key, step_key): parameters are drawn from the first; step s draws from fold_in(step_key, s)."""
    init_key, step_key = jax.random.split(jax.random.key(seed))
    return init_key, step_key


def check_reference_size(config, mesh):
    """R of loss.target='stf' (None for other targets): R >= training.batch_size and a multiple of the devices."""
    if config.loss.get('target') != 'stf':
        return None
    reference_size, batch_size = config.loss.get('reference_size'), config.training.batch_size
    num_devices = mesh.devices.size
    if not isinstance(reference_size, int) or reference_size < batch_size:
        raise UserError(f'config.loss.reference_size={reference_size} must be an integer >= training.batch_size='
                        f'{batch_size}: the STF reference batch holds the minibatch plus R - B other images')
    if reference_size % num_devices:
        raise UserError(f'config.loss.reference_size={reference_size} is not divisible by the number of devices '
                        f'({num_devices}); use a multiple of {num_devices}')
    return reference_size


def with_reference(batch, key, augment):
    """STF's reference batch (jaxdiff.stf): batch['reference'] = the minibatch's (augmented) clean images, then the
    R - B images of batch['reference_extra'] (data stream 1), augmented like training images, independently per
    image. Their augmentation labels are dropped: the target is a weighted average of augmented clean images and
    never reads labels (as in the authors' code, the weights ignore how each image was augmented)."""
    extra = batch['reference_extra']
    if augment is not None:
        extra, _ = augment_lib.augment(key, extra, **augment)
    batch = {name: value for name, value in batch.items() if name != 'reference_extra'}
    return {**batch, 'reference': jnp.concatenate([batch['image'], extra])}


def make_train_step(loss_fn, optimizer, *, seed, batch_size, lr, lr_rampup_images, ema_halflife_images,
                    ema_rampup_ratio, augment=None):
    """train_step(state, metrics, batch) -> (state, metrics); pure, to be jitted.

    augment: jaxdiff.augment keyword options (p, ...) or None. Gradients get EDM's nan_to_num; a non-finite
    loss is recorded in the metrics (the loop stops at the next fetch) rather than checked on the host."""
    _, step_key = root_keys(seed)

    def train_step(state, metrics, batch):
        key = jax.random.fold_in(step_key, state.step)
        augment_key, loss_key = jax.random.split(key)
        if augment is not None:
            image, augment_labels = augment_lib.augment(augment_key, batch['image'], **augment)
            batch = {**batch, 'image': image, 'augment_labels': augment_labels}
        if 'reference_extra' in batch:
            batch = with_reference(batch, jax.random.fold_in(augment_key, 1), augment)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, loss_key)
        grads = jax.tree.map(lambda g: jnp.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5), grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        beta = ema_beta(state.step, batch_size=batch_size, ema_halflife_images=ema_halflife_images,
                        ema_rampup_ratio=ema_rampup_ratio)
        ema_params = jax.tree.map(lambda ema, p: p + beta * (ema - p), state.ema_params, params)
        first_bad = jnp.where((metrics['first_nonfinite_step'] < 0) & ~jnp.isfinite(loss),
                              state.step + 1, metrics['first_nonfinite_step'])
        metrics = {'loss_sum': metrics['loss_sum'] + loss, 'num_steps': metrics['num_steps'] + 1,
                   'first_nonfinite_step': first_bad,
                   'learning_rate': learning_rate(state.step, lr=lr, lr_rampup_images=lr_rampup_images,
                                                  batch_size=batch_size)}
        return TrainState(state.step + 1, params, ema_params, opt_state), metrics
    return train_step


def jit_train_step(train_step, mesh):
    """One compiled step: batch sharded on axis 0 over 'data', state and metrics replicated and donated."""
    replicated, sharded = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)
    return jax.jit(train_step, in_shardings=(replicated, replicated, sharded),
                   out_shardings=(replicated, replicated), donate_argnums=(0, 1))


class Setup(NamedTuple):
    model: Any
    pieces: losses.Pieces
    optimizer: Any
    train_step: Any  # un-jitted


def build(config):
    """Model, loss pieces, optimizer and the (un-jitted) step named by the config; config.training.precision
    (jaxdiff.precision) sets the network's compute dtype and the step's conv / matmul precision."""
    t = config.training
    policy = precision.from_config(config)
    model = precision.apply_to_model(models.from_config(config), policy)
    pieces = losses.build(**config.loss)
    optimizer = make_optimizer(lr=t.lr, lr_rampup_images=t.lr_rampup_images, batch_size=t.batch_size)
    train_step = make_train_step(losses.make_loss(make_network(model), pieces), optimizer, seed=t.seed,
                                 batch_size=t.batch_size, lr=t.lr, lr_rampup_images=t.lr_rampup_images,
                                 ema_halflife_images=t.ema_halflife_images,
                                 ema_rampup_ratio=t.ema_rampup_ratio, augment=augment_options(config.data))
    return Setup(model, pieces, optimizer, precision.with_matmul_precision(train_step, policy))


def abstract_state(config, model, optimizer, mesh):
    """The TrainState's shapes/dtypes, replicated over the mesh (a restore target; nothing is allocated)."""
    shapes = jax.eval_shape(lambda key: init_state(model, optimizer, tuple(config.data.shape), key),
                            jax.random.key(0))
    return checkpoint_lib.abstract_like(shapes, mesh_lib.replicated(mesh))


def total_steps(config):
    """EDM trains until the images seen reach total_images: ceil(total_images / batch_size) steps."""
    return math.ceil(config.training.total_images / config.training.batch_size)


# ---------------------------------------------------------------- host-side helpers of the loop

class Prefetcher:
    """Yields the device batches of steps start, start+1, ... built by a background thread, `size` ahead."""

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


# ---------------------------------------------------------------- the loop

def train(config, workdir, *, source=None, devices=None):
    """Trains (or resumes) in `workdir`. source: a data source overriding config.data (tests, notebooks);
    devices: the devices of the mesh (default: all)."""
    if not workdir:
        raise UserError('--workdir is required for --mode=train')
    t = config.training
    mesh_lib.initialize_distributed(**config.distributed)
    mesh = mesh_lib.make_mesh(devices)
    mesh_lib.check_batch_size(t.batch_size, mesh)
    reference_size = check_reference_size(config, mesh)
    setup = build(config)
    source = data_lib.build(config.data) if source is None else source
    check_source(source, config)
    from jaxdiff.sample import Generator  # sample.py imports this module; import here to avoid a cycle

    num_steps = total_steps(config)
    is_main = jax.process_index() == 0
    checkpoints = checkpoint_lib.Checkpoints(workdir, keep_checkpoints=t.keep_checkpoints)
    if checkpoints.latest_step() is not None:
        state = checkpoints.restore(abstract_state(config, setup.model, setup.optimizer, mesh))
        print(f'resuming from {checkpoints.directory}/{checkpoints.latest_step()}', flush=True)
    else:
        init = jax.jit(lambda key: init_state(setup.model, setup.optimizer, tuple(config.data.shape), key),
                       out_shardings=mesh_lib.replicated(mesh))
        state = init(root_keys(t.seed)[0])
    start = int(jax.device_get(state.step))
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    print(f'training {num_params:,} parameters for steps {start}..{num_steps} (batch {t.batch_size} on '
          f'{mesh.devices.size} device{"s" if mesh.devices.size > 1 else ""}) in {workdir}', flush=True)

    train_step = jit_train_step(setup.train_step, mesh)
    generator = Generator(config, setup.model, setup.pieces.parameterization.precond, mesh)
    log = logger_lib.Logger(workdir, total_steps=num_steps, batch_size=t.batch_size, enabled=is_main)
    reset_metrics = jax.jit(zero_metrics, out_shardings=mesh_lib.replicated(mesh))
    metrics = reset_metrics()

    def make_batch(step):
        local = source.batch(step, t.batch_size, seed=t.seed, process_index=jax.process_index(),
                             process_count=jax.process_count())
        if reference_size and reference_size > t.batch_size:  # STF: R - B more images, an independent sequence
            local['reference_extra'] = source.batch(step, reference_size - t.batch_size, seed=t.seed, stream=1,
                                                    process_index=jax.process_index(),
                                                    process_count=jax.process_count())['image']
        return mesh_lib.global_batch(local, mesh)

    batches = Prefetcher(make_batch, start, num_steps)
    try:
        with StopRequest() as stop:
            for step in range(start, num_steps):
                state, metrics = train_step(state, metrics, next(batches))
                done = step + 1
                if step == start:
                    jax.block_until_ready(state)  # compile time stays out of images/s
                    log.start(done)
                last = done == num_steps or stop.requested
                log_now = done % t.log_every_steps == 0 or last
                save_now = done % t.checkpoint_every_steps == 0 or last
                sample_now = t.sample_every_steps and (done % t.sample_every_steps == 0 or last)
                if log_now or save_now or sample_now:
                    fetched = jax.device_get(metrics)
                    if fetched['first_nonfinite_step'] >= 0:
                        raise NonFiniteLoss(f'loss is NaN/Inf at step {fetched["first_nonfinite_step"]}; stopped '
                                            f'without saving; last good checkpoint: '
                                            f'{_describe_latest(checkpoints)}')
                    if log_now:
                        log.progress(done, {'loss': fetched['loss_sum'] / max(fetched['num_steps'], 1),
                                            'learning_rate': fetched['learning_rate']})
                        metrics = reset_metrics()
                if save_now:
                    checkpoints.save(done, state, force=True)
                if sample_now:
                    samples = generator(state.ema_params, config.sampling.num_samples)
                    if is_main:
                        path = images.save_png(os.path.join(workdir, 'samples', f'step_{done:08d}.png'), samples)
                        print(f'wrote {path}', flush=True)
                if stop.requested:
                    break
    finally:
        batches.close()
        checkpoints.wait_until_finished()
        checkpoints.close()
        log.close()
    return state


def _describe_latest(checkpoints):
    checkpoints.wait_until_finished()
    step = checkpoints.latest_step()
    return 'none' if step is None else os.path.join(checkpoints.directory, str(step))
