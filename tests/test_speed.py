"""What keeps an accelerator busy, checked on CPU (issue 7): the precision policy reaches every conv / matmul,
the train step donates its state, the training loop never synchronizes with the host apart from the metrics fetch
every log_every_steps, batches are prefetched to the devices, and the sampler is one lax.scan compiled once per NFE.
"""
import inspect
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.drivers import loop, sampling, trained as trained_lib, mesh as mesh_lib, precision, train_step
from jaxdiff.modes import train
from test_train import load_config, toy_config

TINY_UNET = dict(name='ddpmpp', model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,),
                 dropout=0.1, augment_dim=0, label_dim=0)


def tiny_unet_config(precision_name):
    config = load_config('quickstart', **{'training.batch_size': 8})
    config.model = TINY_UNET
    config.training.precision = precision_name
    return config


def matmul_eqns(jaxpr):
    """Every conv_general_dilated / dot_general equation of a closed jaxpr, sub-jaxprs (grad, scan, cond) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ('conv_general_dilated', 'dot_general'):
            found.append(eqn)
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(item, 'jaxpr', None)
                if inner is not None and hasattr(inner, 'eqns'):
                    found.extend(matmul_eqns(inner))
                elif hasattr(item, 'eqns'):
                    found.extend(matmul_eqns(item))
    return found


def traced_step(config):
    """(abstract outputs, jaxpr) of train.build's step for `config` (its precision policy applied; nothing compiles)."""
    setup = train_step.build(config)
    t = config.training
    state = jax.eval_shape(lambda k: train_step.init_state(setup.modules, setup.optimizer, tuple(config.data.shape), k),
                           jax.random.key(0))
    batch = {'image': jax.ShapeDtypeStruct((t.batch_size, *config.data.shape), jnp.float32),
             'label': jax.ShapeDtypeStruct((t.batch_size,), jnp.int32)}
    metrics = jax.eval_shape(train_step.zero_metrics)
    step = setup.train_step
    return jax.eval_shape(step, state, metrics, batch), jax.make_jaxpr(step)(state, metrics, batch)


def test_unknown_precision_names_the_field():
    with pytest.raises(ValueError, match=r"config.training.precision='fp16'.*fp32, tf32, bf16"):
        precision.get('fp16')
    with pytest.raises(ValueError, match='needs a model with a `dtype` field'):
        precision.apply_to_model(object(), 'bf16')


@pytest.mark.parametrize('name, expected', [('fp32', jax.lax.Precision.HIGHEST),
                                            ('tf32', jax.lax.Precision.HIGH)])
def test_float32_policies_fix_the_precision_of_every_conv_and_matmul(name, expected):
    """fp32 must not silently run TF32 on a GPU (XLA's default there): every conv / dot of the step, forward and
    backward, carries Precision.HIGHEST; tf32 carries HIGH; both compute in float32."""
    (state, _), jaxpr = traced_step(tiny_unet_config(name))
    eqns = matmul_eqns(jaxpr.jaxpr)
    assert len(eqns) > 30   # convs, their transposes in the backward pass, attention einsums
    assert all(e.params['precision'] == (expected, expected) for e in eqns), \
        {str(e.params['precision']) for e in eqns}
    assert all(e.invars[0].aval.dtype == jnp.float32 for e in eqns)


def test_bf16_computes_in_bfloat16_and_keeps_float32_state_and_loss():
    (state, metrics), jaxpr = traced_step(tiny_unet_config('bf16'))
    eqns = matmul_eqns(jaxpr.jaxpr)
    operand_dtypes = [e.invars[0].aval.dtype for e in eqns]
    convs = [e for e in eqns if e.primitive.name == 'conv_general_dilated']
    assert all(e.invars[0].aval.dtype == jnp.bfloat16 for e in convs), {str(e.invars[0].aval.dtype) for e in convs}
    # only the attention logits stay float32: one dot forward, two backward, in each of the 3 attention blocks
    float32_eqns = [e for e in eqns if e.invars[0].aval.dtype == jnp.float32]
    assert len(float32_eqns) == 9 and all(e.primitive.name == 'dot_general' for e in float32_eqns)
    assert operand_dtypes.count(jnp.bfloat16) > 50
    # parameters, Adam moments and EMA are float32; so is the loss
    for leaf in jax.tree.leaves((state.params, state.ema_params, state.opt_state)):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
    assert metrics['loss_sum'].dtype == jnp.float32


def test_train_step_donates_the_state():
    """The jitted step reuses the state's buffers: after a step the input arrays are deleted (no second copy of
    parameters, EMA and Adam moments is ever alive)."""
    config = toy_config(2, **{'model.hidden_dim': 16, 'model.num_layers': 1})
    setup = train_step.build(config)
    mesh = mesh_lib.make_mesh(jax.devices()[:1])
    state = jax.device_put(train_step.init_state(setup.modules, setup.optimizer, (2,), jax.random.key(0)),
                           mesh_lib.replicated(mesh))
    metrics = jax.device_put(train_step.zero_metrics(), mesh_lib.replicated(mesh))
    batch = mesh_lib.global_batch({'image': np.ones((64, 2), np.float32), 'label': np.zeros(64, np.int32)}, mesh)
    step = train_step.Jit(mesh).compile(setup.train_step)
    new_state, new_metrics = step(state, metrics, batch)
    jax.block_until_ready(new_state)
    old_leaves = jax.tree.leaves(state)
    assert len(old_leaves) > 10 and all(x.is_deleted() for x in old_leaves)
    # the metric accumulators the step reads are donated too (the learning rate is only written: jit prunes it)
    assert all(metrics[name].is_deleted() for name in ('loss_sum', 'num_steps', 'first_nonfinite_step'))
    assert not any(x.is_deleted() for x in jax.tree.leaves((new_state, new_metrics)))
    assert not batch['image'].is_deleted()   # the batch is not donated (it may be reused by a caller)


def test_training_loop_syncs_with_the_host_only_to_fetch_metrics(tmp_path, monkeypatch):
    """The model trainer's loop (drivers/loop.py's run: everything inside its StopRequest block: steps, logging,
    the final checkpoint and sample grid) runs under jax.transfer_guard('disallow'): any implicit transfer
    (float(loss), np.asarray(x), `if x > 0` on a device value, a Python scalar passed to the step) raises. The
    explicit device_get calls of modes/train.py and drivers/loop.py are counted: one per log_every_steps (plus the
    last step), none elsewhere. Every batch the loop receives is already on the mesh's devices (built and
    transferred by the prefetch thread)."""
    steps, every = 8, 3
    config = toy_config(steps, **{'training.log_every_steps': every, 'training.checkpoint_every_steps': 100,
                                  'model.hidden_dim': 16, 'model.num_layers': 1})
    window = {'entered': 0, 'active': False}
    fetches, batches = [], []

    class GuardedLoop(loop.StopRequest):
        def __enter__(self):
            window['entered'] += 1
            window['active'] = True
            self._guard = jax.transfer_guard('disallow')
            self._guard.__enter__()
            return super().__enter__()

        def __exit__(self, *exc):
            super().__exit__(*exc)
            window['active'] = False
            return self._guard.__exit__(*exc)

    class RecordingPrefetcher(loop.Prefetcher):
        def __next__(self):
            batch = super().__next__()
            batches.append(batch)
            return batch

    device_get = jax.device_get

    def counting_device_get(x):
        caller = inspect.stack()[1]
        if window['active'] and caller.filename in (train.__file__, loop.__file__):
            fetches.append(caller.lineno)
        return device_get(x)

    monkeypatch.setattr(loop, 'StopRequest', GuardedLoop)
    monkeypatch.setattr(loop, 'Prefetcher', RecordingPrefetcher)
    monkeypatch.setattr(jax, 'device_get', counting_device_get)
    devices = jax.devices()[:2]
    state = train.run(config, str(tmp_path), devices=devices)

    assert window['entered'] == 1   # the guard really covered the loop
    assert int(device_get(state.step)) == steps
    assert len(fetches) == len([s for s in range(1, steps + 1) if s % every == 0 or s == steps])  # 3, 6, 8
    assert len(batches) == steps
    for batch in batches:
        for value in batch.values():
            assert isinstance(value, jax.Array) and value.sharding.device_set == set(devices)


def test_prefetcher_builds_batches_ahead_in_the_background():
    """After the loop takes batch 0, the thread goes on building batches 1, 2, ... (`size` queued ahead, one
    more waiting) without the loop asking; it stops there (bounded memory)."""
    built = []

    def make_batch(step):
        built.append(step)
        return {'image': jax.device_put(np.full((2,), step, np.float32))}

    prefetcher = loop.Prefetcher(make_batch, 0, 100, size=2)
    try:
        first = next(prefetcher)
        assert float(first['image'][0]) == 0
        deadline = time.monotonic() + 30
        while len(built) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert built == [0, 1, 2, 3]            # 2 queued + 1 built and waiting for room; no more
        assert [float(next(prefetcher)['image'][0]) for _ in range(3)] == [1, 2, 3]
    finally:
        prefetcher.close()


class TraceCounter:
    """A model whose `apply` counts how often it is traced (a Python side effect runs only while tracing)."""

    def __init__(self, model):
        self.model, self.traces, self.label_dim = model, 0, 0

    def apply(self, *args, **kwargs):
        self.traces += 1
        return self.model.apply(*args, **kwargs)


def test_sampler_is_one_scan_compiled_once_per_nfe():
    """The Heun sampler of `generate.Generator` is one lax.scan: tracing it calls the network a fixed number of
    times (the Euler call and the correction in lax.cond) whatever the NFE; sampling again with the same NFE
    does not trace again; another NFE traces once more."""
    config = toy_config(1, **{'model.hidden_dim': 16, 'model.num_layers': 1, 'sampling.batch_size': 8})
    setup = train_step.build(config)
    params = train_step.init_state(setup.modules, setup.optimizer, (2,), jax.random.key(0)).params['model']
    mesh = mesh_lib.make_mesh(jax.devices()[:1])
    traces_per_compile = []
    for num_steps in (18, 6):
        config.sampling.schedule_options.num_steps = num_steps
        counter = TraceCounter(setup.model)
        generator = sampling.generator(
            config, mesh, trained_lib.denoiser_fn_for(counter, setup.loss.parameterization.precond))
        variables = {'params': {'model': params}, 'model_state': {}}
        first = generator(variables, 8)
        traced = counter.traces
        second = generator(variables, 16)          # two more batches, same NFE: no new trace
        assert counter.traces == traced
        assert generator.nfe == 2 * num_steps - 1
        np.testing.assert_array_equal(first, second[:8])
        traces_per_compile.append(traced)
    assert traces_per_compile == [2, 2]          # 35 NFE and 11 NFE, each traced as 2 calls inside one scan
