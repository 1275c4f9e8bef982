"""jit and pmap: the training step under `training.parallelism='pmap'` (lax.pmean over 8 simulated devices) gives
the parameters of the sharded jit step; every sampler gives the same samples under jax.jit, jax.pmap and jax.vmap."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.core import analytic, samplers, schedules
from jaxdiff.drivers import mesh as mesh_lib, train_step
from jaxdiff.modes import train
from test_train import toy_config

SAMPLERS = [('euler', {}), ('heun', {}), ('heun', {'s_churn': 10.0}), ('dpm2', {}), ('dpmpp_2m', {}),
            ('dpmpp_3m', {}), ('ipndm', {}), ('ddim', {}), ('ddim', {'eta': 1.0}), ('gmm_ddim', {'eta': 1.0}),
            ('amed', {}), ('adaptive', {})]


def test_pmap_and_jit_training_give_the_same_parameters(tmp_path):
    assert len(jax.devices()) == 8
    results = {}
    for parallelism in ('jit', 'pmap'):
        config = toy_config(4, **{'training.parallelism': parallelism, 'model.dropout': 0.0,
                                  'training.checkpoint_every_steps': 2})
        results[parallelism] = train.run(config, str(tmp_path / parallelism))
    jit_state, pmap_state = results['jit'], results['pmap']
    assert int(pmap_state.step) == int(jit_state.step) == 4
    # the EMA lags the parameters after a few steps: the run did train (equality below is not vacuous)
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(jit_state.params), jax.tree.leaves(jit_state.ema_params)))
    assert moved > 0
    for a, b in zip(jax.tree.leaves(jit_state), jax.tree.leaves(pmap_state)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_pmap_training_resumes_from_its_checkpoint(tmp_path):
    """A pmap run saves plain (unreplicated) arrays: a jit run continues from them."""
    config = toy_config(4, **{'training.parallelism': 'jit', 'model.dropout': 0.0})
    train.run(toy_config(2, **{'training.parallelism': 'pmap', 'model.dropout': 0.0}), str(tmp_path / 'a'))
    resumed = train.run(config, str(tmp_path / 'a'))
    straight = train.run(config, str(tmp_path / 'b'))
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_pmap_get_state_is_device_0s_copy_replicated_and_outlives_donation(caplog):
    """Pmap.get_state: device 0's row of every leaf (the devices may differ here, so a wrong row shows), as arrays
    replicated over the mesh like the 'jit' state, still readable after the next pmapped step donated its input,
    and no XLA program compiled for it (x[0] compiles a gather over all devices; RESULTS.md "CPU collectives")."""
    mesh = mesh_lib.make_mesh()
    parallel = train_step.parallel('pmap', mesh)
    rows = np.arange(8 * 5, dtype=np.float32).reshape(8, 5)
    state = jax.device_put({'w': rows, 'b': -rows}, parallel.sharding)
    with caplog.at_level('DEBUG'), jax.log_compiles():
        plain = parallel.get_state(state)
    assert not [r for r in caplog.records if 'compil' in r.getMessage().lower()]
    step = parallel.compile(lambda s, m: (jax.tree.map(lambda x: x + 1, s), m))
    donated = state
    state, _ = step(state, {'n': jnp.zeros(8)})
    with pytest.raises(Exception, match='deleted'):                    # the step did take the buffers
        np.asarray(donated['w'])
    assert int(jax.device_get(state['w'])[0, 0]) == 1
    for name, want in (('w', rows[0]), ('b', -rows[0])):
        assert plain[name].sharding.is_equivalent_to(mesh_lib.replicated(mesh), 1)
        np.testing.assert_array_equal(np.asarray(plain[name]), want)
    # the placement owns XLA:CPU's collectives workaround: on several CPU devices the loop waits every 4 steps and
    # no host callback runs inside the step; on one device neither
    one_device = mesh_lib.make_mesh(jax.devices()[:1])
    for name in ('jit', 'pmap'):
        several, single = train_step.parallel(name, mesh), train_step.parallel(name, one_device)
        assert several.max_steps_in_flight == 4 and several.host_callbacks_in_step is False
        assert single.max_steps_in_flight is None and single.host_callbacks_in_step is True
        assert several.num_devices == 8 and single.num_devices == 1


def test_refresh_runs_on_one_cpu_device_and_joins_the_batch_sharded():
    """Jit.place_refresh: on several CPU devices (one process) the refresh runs on the first device and its output
    comes back split over the mesh like the batch, with the values of the sharded computation."""
    mesh = mesh_lib.make_mesh()
    fn = lambda rows, key: {'x': rows['x'] * 2 + jax.random.normal(key, rows['x'].shape)}
    rows, key = {'x': jnp.arange(16.0).reshape(8, 2)}, jax.random.key(0)
    placed = train_step.parallel('jit', mesh).place_refresh(fn)(rows, key)
    assert placed['x'].sharding.is_equivalent_to(mesh_lib.batch_sharding(mesh), 2)
    np.testing.assert_array_equal(np.asarray(placed['x']), np.asarray(jax.jit(fn)(rows, key)['x']))


@pytest.mark.parametrize('name, options', SAMPLERS, ids=lambda v: str(v))
def test_every_sampler_gives_the_jit_samples_under_pmap_and_vmap(name, options):
    mixture = analytic.GaussianMixture(jnp.array([[-1.0, 0.0], [1.0, 0.5]]), jnp.array([0.2, 0.3]),
                                       jnp.array([0.4, 0.6]))
    sampler = samplers.get(name, **options)
    sigmas = np.asarray(schedules.get('edm', num_steps=6))   # a concrete grid (adaptive reads its values)
    key = jax.random.key(3)
    chunks = 2.0 * jax.random.normal(jax.random.key(1), (8, 4, 2)) * sigmas[0] / 2.0

    def sample(x_T):
        return sampler(mixture.denoiser, x_T, sigmas, key=key)[0]

    expected = np.stack([np.asarray(jax.jit(sample)(chunk)) for chunk in chunks])
    np.testing.assert_allclose(np.asarray(jax.pmap(sample)(chunks)), expected, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(jax.vmap(sample)(chunks)), expected, rtol=2e-5, atol=2e-5)
    assert np.all(np.isfinite(expected))
