"""The pieces of one training step, used by `modes/train.py` (the model trainer on `drivers/loop.py`), benchmarks
and tests.

    setup = build(config)                   # model, Loss, optimizer, the un-compiled step, and the run's numbers
    placement = parallel(setup.parallelism, mesh)    # Jit | Pmap: compiles the step and places state and batches
    state = TrainState(step, params, ema_params, opt_state, model_state); params = {'model': ..., <extra>: ...}
    step s: key = fold_in(base_key, s); batch = loss.prepare(batch) (augmentation, method rows);
            (loss, metrics)(params, batch, key) -> grads -> Adam (EDM lr ramp) -> EMA

Extra trainable networks a loss asks for (`losses.Hooks.extra_networks`) live in the
same params tree under their own name, under the same optimizer and EMA. `model_state` holds the model's
non-trainable collections (e.g. stored Fourier frequencies, collection 'buffers'); it never changes.

Two ways to run a step on several devices (config.training.parallelism):
  'jit'   the step is jitted over Mesh('data'): batch sharded on axis 0, state replicated (default; multi-host)
  'pmap'  the same step under jax.pmap over the local devices: state replicated per device, gradients, loss and
          metrics averaged with lax.pmean
Under pmap the loss draws sigma and noise for the global batch and keeps each device's rows
(`losses.draw_per_example`), so the two give the same parameters up to float32 summation order (augmentation and
dropout draw per device under pmap). Hyper-parameters follow EDM's training_loop.py
(Karras et al. 2022, App. F.2); config fields have the names of the arguments they feed.
"""
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff.core import augment as augment_lib
from jaxdiff.drivers import checkpoint as checkpoint_lib
from jaxdiff.core import losses
from jaxdiff.drivers import mesh as mesh_lib, precision
from jaxdiff import models

PMAP_AXIS = 'batch'


class TrainState(NamedTuple):
    step: Any          # int32 scalar: optimizer steps taken
    params: Any        # {'model': ..., <extra network>: ...}
    ema_params: Any    # the same tree, averaged
    opt_state: Any
    model_state: Any   # the model's non-trainable collections ({} for most models)


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


# ---------------------------------------------------------------- networks and state

def init_variables(modules, data_shape, key):
    """(params, model_state): params {name: the module's 'params'} for every module of `modules` ({'model': ...,
    <extra>: ...}), module i from fold_in(key, i) (the model from `key` itself); model_state the model's other
    collections."""
    params, model_state = {}, {}
    for i, (name, module) in enumerate(modules.items()):
        module_key = key if name == 'model' else jax.random.fold_in(key, i)
        variables = models.init(module, data_shape, module_key)
        params[name] = variables['params']
        if name == 'model':
            model_state = {k: v for k, v in variables.items() if k != 'params'}
    return params, model_state


def init_state(modules, optimizer, data_shape, key):
    """Fresh parameters (EMA = a copy) and optimizer state."""
    params, model_state = init_variables(modules, data_shape, key)
    # the EMA gets its own buffers: the step donates both trees, and one buffer must not be donated twice
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=jax.tree.map(jnp.copy, params),
                      opt_state=optimizer.init(params), model_state=model_state)


def drop_labels(class_labels, key, label_dropout, batch):
    """Each example's one-hot label replaced by the null label, the all-zero row, with probability label_dropout:
    the joint training of a conditional and an unconditional model in one network (Ho & Salimans 2022, Algorithm 1,
    p_uncond). Drawn per example of the global batch (losses.draw_per_example), so neither the device
    count nor pmap changes which examples lose their label."""
    keep = losses.draw_per_example(key, class_labels.shape[:1],
                                   lambda key, shape: jax.random.bernoulli(key, 1 - label_dropout, shape), batch)
    return class_labels * keep[:, None].astype(class_labels.dtype)


def make_network(model, model_state=None, label_dropout=0.0):
    """network(params, x_in, c_noise, batch, key) -> F for the loss: class labels (one-hot, each replaced by the
    null label with probability label_dropout) and augmentation labels come from the batch, dropout from key."""
    label_dim = getattr(model, 'label_dim', 0)

    def network(params, x_in, c_noise, batch, key):
        class_labels = jax.nn.one_hot(batch['label'], label_dim) if label_dim else None
        if label_dim and label_dropout:
            key, label_key = jax.random.split(key)
            class_labels = drop_labels(class_labels, label_key, label_dropout, batch)
        return model.apply({'params': params, **(model_state or {})}, x_in, c_noise, class_labels=class_labels,
                           augment_labels=batch.get('augment_labels'), train=True, rngs={'dropout': key})
    return network


def make_extra_network(module):
    """network(params, *inputs, key) -> output of an extra trainable module (train mode, dropout from key)."""
    def network(params, *inputs, key):
        return module.apply({'params': params}, *inputs, train=True, rngs={'dropout': key})
    return network


def augment_fn(augment_config):
    """(key, images) -> (images, augment_labels) from config.augment (fields = jaxdiff.core.augment.augment's keyword
    arguments); None when config.augment.p is 0 (no augmentation)."""
    options = dict(augment_config or {})
    if not options.get('p'):
        return None
    return functools.partial(augment_lib.augment, **options)


def zero_metrics():
    """On-device accumulators, fetched only every log_every_steps (no host sync inside the loop)."""
    return {'loss_sum': jnp.zeros((), jnp.float32), 'num_steps': jnp.zeros((), jnp.int32),
            'first_nonfinite_step': jnp.full((), -1, jnp.int32), 'learning_rate': jnp.zeros((), jnp.float32)}


def root_keys(seed):
    """(init_key, step_key): parameters are drawn from the first; step s draws from fold_in(step_key, s)."""
    init_key, step_key = jax.random.split(jax.random.key(seed))
    return init_key, step_key


def refresh_key(seed):
    """Key of `losses.Hooks.refresh` for period k: fold_in(refresh_key(seed), k) (independent of the step keys)."""
    return jax.random.fold_in(root_keys(seed)[1], -1 & 0x7FFFFFFF)


# ---------------------------------------------------------------- the step

def apply_gradients(optimizer, state, grads, beta):
    """(params, ema_params, opt_state) after one optimizer step on `grads` and the EMA with decay beta."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = jax.tree.map(lambda ema, p: p + beta * (ema - p), state.ema_params, params)
    return params, ema_params, opt_state


def make_train_step(loss, networks, optimizer, *, seed, batch_size, lr, lr_rampup_images, ema_halflife_images,
                    ema_rampup_ratio, augment=None, axis_name=None):
    """train_step(state, metrics, batch) -> (state, metrics); pure, to be jitted (or pmapped with `axis_name`).

    loss: a `losses.Loss`; networks(model_state) -> the dict of network functions the loss drives; augment:
    (key, images) -> (images, labels) or None. batch['index'] (global example indices) keys the per-example
    draws. Gradients get EDM's nan_to_num; a non-finite loss is recorded in the metrics (the loop stops at the
    next fetch) rather than checked on the host. With `axis_name`, gradients, loss and metrics are lax.pmean'd."""
    _, step_key = root_keys(seed)
    mean = (lambda x: jax.lax.pmean(x, axis_name)) if axis_name else (lambda x: x)

    def train_step(state, metrics, batch):
        key = jax.random.fold_in(step_key, state.step)
        prepare_key, loss_key = jax.random.split(key)
        if 'index' in batch:
            batch = {**batch, 'global_size': batch_size}
        batch = loss.prepare(batch, prepare_key, augment, state.step)
        loss_fn = loss.make(networks(state.model_state))
        (value, loss_metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, loss_key)
        value, grads, loss_metrics = mean((value, grads, loss_metrics))
        grads = jax.tree.map(lambda g: jnp.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5), grads)
        beta = ema_beta(state.step, batch_size=batch_size, ema_halflife_images=ema_halflife_images,
                        ema_rampup_ratio=ema_rampup_ratio)
        params, ema_params, opt_state = apply_gradients(optimizer, state, grads, beta)
        first_bad = jnp.where((metrics['first_nonfinite_step'] < 0) & ~jnp.isfinite(value),
                              state.step + 1, metrics['first_nonfinite_step'])
        metrics = {**{name: metrics.get(name, 0.0) + v for name, v in loss_metrics.items()},
                   'loss_sum': metrics['loss_sum'] + value, 'num_steps': metrics['num_steps'] + 1,
                   'first_nonfinite_step': first_bad,
                   'learning_rate': learning_rate(state.step, lr=lr, lr_rampup_images=lr_rampup_images,
                                                  batch_size=batch_size)}
        return state._replace(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state), \
            metrics
    return train_step


class Setup(NamedTuple):
    """Everything a training run builds from its config (`build`): the loop reads no config."""
    model: Any
    modules: dict      # {'model': model, <extra network>: module}
    loss: losses.Loss
    optimizer: Any
    train_step: Any    # un-jitted (or un-pmapped)
    parallelism: str   # 'jit' | 'pmap' (config.training.parallelism, checked by config_check)
    precond: Any       # the loss's preconditioning: sampling's denoiser is Denoiser(model, precond)
    augment: Any       # (key, images) -> (images, augment_labels), or None
    data_shape: tuple  # one example's shape (config.data.shape)
    batch_size: int    # the global batch
    seed: int
    num_steps: int     # total_steps(config)

    def abstract_state(self, mesh):
        """The TrainState's shapes/dtypes, replicated over the mesh (a restore target; nothing is allocated)."""
        shapes = jax.eval_shape(lambda key: init_state(self.modules, self.optimizer, self.data_shape, key),
                                jax.random.key(0))
        return checkpoint_lib.abstract_like(shapes, mesh_lib.replicated(mesh))

    def init_state(self, mesh):
        """A fresh TrainState (parameters from root_keys(seed)[0]), replicated over the mesh."""
        init = jax.jit(lambda key: init_state(self.modules, self.optimizer, self.data_shape, key),
                       out_shardings=mesh_lib.replicated(mesh))
        return init(root_keys(self.seed)[0])


def build(config):
    """Model (+ the loss's extra networks), Loss, optimizer and the un-compiled step named by the config;
    config.training.precision (jaxdiff.drivers.precision) sets the network's compute dtype and the step's matmul
    precision."""
    training = config.training
    policy = precision.from_config(config)
    model = precision.apply_to_model(models.from_config(config), policy)
    loss = losses.build(**config.loss)
    modules = {'model': model, **{name: models.from_config(config, section=name)
                                  for name in loss.hooks.extra_networks}}
    parallelism = training.get('parallelism', 'jit')
    optimizer = make_optimizer(lr=training.lr, lr_rampup_images=training.lr_rampup_images,
                               batch_size=training.batch_size)
    augment = augment_fn(config.get('augment'))

    def networks(model_state):
        return {'model': make_network(model, model_state, training.get('label_dropout', 0.0)),
                **{name: make_extra_network(module) for name, module in modules.items() if name != 'model'}}

    train_step = make_train_step(loss, networks, optimizer, seed=training.seed, batch_size=training.batch_size,
                                 lr=training.lr, lr_rampup_images=training.lr_rampup_images,
                                 ema_halflife_images=training.ema_halflife_images,
                                 ema_rampup_ratio=training.ema_rampup_ratio, augment=augment,
                                 axis_name=PMAP_AXIS if parallelism == 'pmap' else None)
    return Setup(model, modules, loss, optimizer, precision.with_matmul_precision(train_step, policy), parallelism,
                 loss.parameterization.precond, augment, tuple(config.data.shape), training.batch_size,
                 training.seed, total_steps(config))


def abstract_state(config, modules, optimizer, mesh):
    """The TrainState's shapes/dtypes, replicated over the mesh, from a config and its networks (`Setup.abstract_state`
    when a Setup is at hand)."""
    shapes = jax.eval_shape(lambda key: init_state(modules, optimizer, tuple(config.data.shape), key),
                            jax.random.key(0))
    return checkpoint_lib.abstract_like(shapes, mesh_lib.replicated(mesh))


def abstract_ema(config, modules, mesh):
    """The EMA item's shapes ({'params': ..., 'model_state': ...}) from the networks alone (no optimizer)."""
    shapes = jax.eval_shape(lambda key: init_variables(modules, tuple(config.data.shape), key), jax.random.key(0))
    return checkpoint_lib.abstract_like({'params': shapes[0], 'model_state': shapes[1]},
                                        mesh_lib.replicated(mesh))


def ema_item(state):
    """What sampling needs from a TrainState: the EMA parameters and the model's fixed collections."""
    return {'params': state.ema_params, 'model_state': state.model_state}


def total_steps(config):
    """EDM trains until the images seen reach total_images: ceil(total_images / batch_size) steps."""
    return math.ceil(config.training.total_images / config.training.batch_size)


# ---------------------------------------------------------------- placing the work: jit over a mesh, or pmap

# Steps a loop may queue before it waits for one, on a mesh of several CPU devices (`Placement.max_steps_in_flight`)
CPU_MAX_STEPS_IN_FLIGHT = 4


class Placement:
    """Where a run's work goes (`Jit` or `Pmap`, made by `parallel`), and the one owner of what XLA:CPU's in-process
    collectives need on a mesh of several CPU devices. There (jaxlib 0.10) they deadlock when too many
    multi-device programs are queued: small all-reduce steps dispatched without waiting hit the rendezvous timeout
    (the process aborts) within 30 steps, with a bound of 1 to 16 they ran 2000+ steps, with 32 one run of two
    aborted; and a host callback inside a sharded program deadlocks the collectives around it
    (benchmarks/cpu_collectives.py; RESULTS.md "CPU collectives"). So on several CPU devices:
      max_steps_in_flight     4: a loop waits for every 4th step (None elsewhere: no bound)
      host_callbacks_in_step  False: a config that would run a host callback inside the step is refused
                              (the loss's check reads it)
      place_refresh           runs the refresh of rows that last several steps on one device, then splits it
      Pmap.get_state          copies device 0's shard through the host (no multi-device gather)
    No mode or loop asks for the backend or the device count."""

    def __init__(self, mesh):
        self.mesh = mesh
        self.num_devices = mesh.devices.size
        self._cpu_collectives = self.num_devices > 1 and mesh.devices.flat[0].platform == 'cpu'

    @property
    def max_steps_in_flight(self):
        """How many steps a loop may dispatch before it waits for one (None: no bound)."""
        return CPU_MAX_STEPS_IN_FLIGHT if self._cpu_collectives else None

    @property
    def host_callbacks_in_step(self):
        """Whether a host callback (e.g. an assignment solved by a host library) may run inside the step."""
        return not self._cpu_collectives


class Jit(Placement):
    """The step jitted over Mesh('data'): batch sharded on axis 0, state and metrics replicated and donated."""
    name = 'jit'

    def compile(self, fn, donate=True):
        replicated = mesh_lib.replicated(self.mesh)
        return jax.jit(fn, in_shardings=(replicated, replicated, mesh_lib.batch_sharding(self.mesh)),
                       out_shardings=(replicated, replicated), donate_argnums=(0, 1) if donate else ())

    def jit(self, fn, *, num_replicated, donate=()):
        """fn(*replicated, batch) jitted: its first num_replicated arguments replicated, the last one sharded on
        axis 0 (the outputs' shardings left to the compiler)."""
        replicated, sharded = mesh_lib.replicated(self.mesh), mesh_lib.batch_sharding(self.mesh)
        return jax.jit(fn, in_shardings=(replicated,) * num_replicated + (sharded,), donate_argnums=donate)

    def put_state(self, tree):
        return jax.device_put(tree, mesh_lib.replicated(self.mesh))

    def get_state(self, tree):
        return tree

    def put_batch(self, local_batch):
        return mesh_lib.global_batch(local_batch, self.mesh)

    def jit_replicated(self, fn):
        return jax.jit(fn, out_shardings=mesh_lib.replicated(self.mesh))

    def place_refresh(self, fn):
        """fn(rows, key) -> rows that join the step's batch, compiled: its output sharded like the batch. In one
        process on several CPU devices it runs on the first device and is split over the mesh afterwards (the
        class docstring); the rows are one pool, cheap to move."""
        sharded = mesh_lib.batch_sharding(self.mesh)
        if self.host_callbacks_in_step or jax.process_count() > 1:
            return jax.jit(fn, out_shardings=sharded)
        compiled, first = jax.jit(fn), self.mesh.devices.flat[0]
        return lambda rows, key: jax.device_put(compiled(*jax.device_put((rows, key), first)), sharded)


class Pmap(Placement):
    """The step under jax.pmap over this host's devices: state replicated along a leading device axis, the
    batch split [num_devices, B / num_devices, ...]."""
    name = 'pmap'

    def __init__(self, mesh):
        if jax.process_count() > 1:
            raise ValueError("training.parallelism='pmap' runs on one host; use 'jit' on several")
        super().__init__(mesh)
        self.devices = list(mesh.devices.flat)
        # pmap's own layout: a leading axis split over the devices
        self.sharding = NamedSharding(Mesh(np.asarray(self.devices), (PMAP_AXIS,)), PartitionSpec(PMAP_AXIS))

    def compile(self, fn, donate=True):
        return jax.pmap(fn, axis_name=PMAP_AXIS, devices=self.devices, donate_argnums=(0, 1) if donate else ())

    def put_state(self, tree):
        """The tree with a leading device axis (pmap's input layout), one copy per device."""
        n = len(self.devices)
        copies = lambda x: np.broadcast_to(np.asarray(jax.device_get(x)), (n, *np.shape(x)))
        return jax.tree.map(lambda x: jax.device_put(copies(x), self.sharding), tree)

    def get_state(self, tree):
        """The state of device 0 (all devices hold the same), as arrays replicated over the mesh (as under 'jit').
        Copied through the host from device 0's own shard: `x[0]` would dispatch a gather over all devices per leaf,
        and that many in-flight multi-device programs deadlock XLA:CPU's in-process collectives (`Placement`)."""
        first, replicated = self.devices[0], mesh_lib.replicated(self.mesh)

        def row_0(x):
            shard = next(shard for shard in x.addressable_shards if shard.device == first)
            return jax.device_put(np.asarray(shard.data)[0], replicated)
        return jax.tree.map(row_0, tree)

    def put_batch(self, local_batch):
        """[B, ...] -> [num_devices, B / num_devices, ...] (pmap splits the leading axis over the devices)."""
        n = len(self.devices)
        return {name: jax.device_put(np.asarray(x).reshape(n, x.shape[0] // n, *x.shape[1:]), self.sharding)
                for name, x in local_batch.items()}

    def jit_replicated(self, fn):
        return lambda *args: self.put_state(jax.jit(fn)(*args))

    def place_refresh(self, fn):
        """fn(rows, key) -> rows that join the step's batch, jitted."""
        return jax.jit(fn)


def parallel(parallelism, mesh):
    """The Placement of config.training.parallelism ('jit' | 'pmap') on `mesh`."""
    return {'jit': Jit, 'pmap': Pmap}[parallelism](mesh)


# ---------------------------------------------------------------- the input of a step

def make_batch_fn(source, loss, *, batch_size, seed, start, with_index=False):
    """make_batch(step) -> this host's rows of the step's batch (numpy): the minibatch (with its examples'
    positions in the global batch, batch['index'], when `with_index`: pmap), and the rows the loss's hooks ask for
    (`losses.Rows`; a row set with period p is fetched at the first step of each period and at `start`, the first
    step of this run)."""
    process_index, process_count = jax.process_index(), jax.process_count()
    rows = loss.rows(batch_size)
    host_slice = slice(process_index * batch_size // process_count, (process_index + 1) * batch_size // process_count)

    def make_batch(step):
        local = source.batch(step, batch_size, seed=seed, process_index=process_index, process_count=process_count)
        if with_index:
            local['index'] = np.arange(batch_size, dtype=np.int32)[host_slice]
        for r in rows:
            if r.period == 1 or step % r.period == 0 or step == start:
                fetched = source.batch(step // r.period, r.size, seed=seed, stream=r.stream,
                                       process_index=process_index, process_count=process_count)
                local[r.name] = fetched['image']
                local[r.name + '_label'] = fetched['label']
        return local
    return make_batch


def batch_fn(setup, source, placement, start):
    """batch(step) -> the step's batch placed on the devices (`make_batch_fn` + `Placement.put_batch`)."""
    make_batch = make_batch_fn(source, setup.loss, batch_size=setup.batch_size, seed=setup.seed, start=start,
                               with_index=placement.name == 'pmap')
    return lambda step: placement.put_batch(make_batch(step))


class Refresher:
    """Rows that last several steps (`losses.Rows.period` > 1) go through the loss's refresh hook once per period
    (placed by `Placement.place_refresh`); its output joins each batch of the period. Rows of period 1 pass straight
    to the step."""

    def __init__(self, setup, placement):
        loss = setup.loss
        self.rows = [r for r in loss.rows(setup.batch_size) if r.period > 1]
        refresh = loss.hooks.refresh
        if self.rows and refresh is None:
            raise ValueError('a loss piece asks for rows with a period but has no refresh hook')
        self.period = self.rows[0].period if self.rows else None
        self.key = refresh_key(setup.seed)
        self.cached = None
        if refresh is not None:
            augment = setup.augment
            self._refresh = placement.place_refresh(lambda rows, key: refresh(rows, key, augment))

    def __call__(self, step, batch):
        if not self.rows:
            return batch
        names = [name for r in self.rows for name in (r.name, r.name + '_label')]
        if any(name in batch for name in names):
            fetched = {name: batch[name] for name in names}
            self.cached = self._refresh(fetched, jax.random.fold_in(self.key, step // self.period))
        batch = {name: value for name, value in batch.items() if name not in names}
        return {**batch, **self.cached}
