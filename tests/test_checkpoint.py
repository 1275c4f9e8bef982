"""The orbax wrapper: exact round trip of a TrainState, keep-last-K, and one-line errors naming the path."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdiff.drivers import checkpoint, mesh as mesh_lib
from jaxdiff.core.errors import UserError
from jaxdiff.drivers.train_step import TrainState


def make_state(seed):
    params = {'dense': {'kernel': jax.random.normal(jax.random.key(seed), (3, 4)), 'bias': jnp.arange(4.0)}}
    optimizer = optax.adam(1e-3)
    return TrainState(step=jnp.asarray(seed, jnp.int32), params=params,
                      ema_params=jax.tree.map(lambda x: x * 0.5, params), opt_state=optimizer.init(params),
                      model_state={})


def abstract(state):
    return checkpoint.abstract_like(state, mesh_lib.replicated(mesh_lib.make_mesh()))


def test_round_trip_is_exact_and_keeps_last_k(tmp_path):
    checkpoints = checkpoint.Checkpoints(tmp_path, keep_checkpoints=2)
    states = {step: make_state(step) for step in (1, 2, 3)}
    for step, state in states.items():
        checkpoints.save(step, state, force=True)
    checkpoints.wait_until_finished()
    assert checkpoints.all_steps() == [2, 3]
    restored = checkpoints.restore(abstract(states[3]))
    checkpoints.close()
    assert isinstance(restored, TrainState) and type(restored.opt_state) is type(states[3].opt_state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(states[3])):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    step, latest = checkpoint.restore_latest(tmp_path, abstract(states[3]))
    assert step == 3 and int(latest.step) == 3


def test_missing_checkpoint_is_a_one_line_error_naming_the_path(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / 'checkpoints')) as info:
        checkpoint.restore_latest(tmp_path, abstract(make_state(0)))
    assert '\n' not in str(info.value)
    os.makedirs(tmp_path / 'checkpoints')
    with pytest.raises(UserError, match='no checkpoint found in'):
        checkpoint.restore_latest(tmp_path, abstract(make_state(0)))


def test_unreadable_checkpoint_is_a_one_line_error_naming_the_path(tmp_path):
    checkpoints = checkpoint.Checkpoints(tmp_path)
    checkpoints.save(5, make_state(5), force=True)
    checkpoints.close()
    for root, _, files in os.walk(tmp_path / 'checkpoints' / '5'):   # corrupt every file of the step
        for name in files:
            with open(os.path.join(root, name), 'wb') as f:
                f.write(b'garbage')
    with pytest.raises(UserError, match=str(tmp_path / 'checkpoints')) as info:
        checkpoint.restore_latest(tmp_path, abstract(make_state(0)))
    assert '\n' not in str(info.value)
