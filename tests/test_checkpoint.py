"""The orbax wrapper: exact round trip of a TrainState, keep-last-K, and one-line errors naming the path; on the loop
skeleton, saves are asynchronous (training goes on while one is written, the end waits for the last), a failed
background write stops the run with one line, and the stop agreed through JAX's preemption sync point counts the
loop's own calls."""
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


# ---------------------------------------------------------------- asynchronous saves on the loop skeleton

def count_run(workdir, num_steps, on_step=None, **checkpoint_options):
    """loop.run of a counter (state {'w', 'step'}) saving every 2 steps, resumed from the newest checkpoint of
    `workdir`; on_step(step) after each step function. Returns the final state."""
    from jaxdiff.drivers import loop
    checkpoints = checkpoint.Checkpoints(workdir, **checkpoint_options)
    init = lambda: {'w': jnp.zeros((64,), jnp.float32), 'step': jnp.zeros((), jnp.int32)}
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def step_fn(state, step, batch):
        state = {'w': state['w'] + batch, 'step': state['step'] + 1}
        if on_step is not None:
            on_step(step)
        return state
    try:
        start, state = loop.restore_or_init(checkpoints, checkpoint.abstract_like(jax.eval_shape(init), sharding),
                                            init)
        return loop.run(state, start=start, num_steps=num_steps, step_fn=step_fn,
                        batch_fn=lambda s: np.float32(s), cadence={loop.CHECKPOINT: 2}, checkpoints=checkpoints,
                        items=lambda state: {'state': state, 'ema': {'w': state['w']}})
    finally:
        try:
            checkpoints.wait_until_finished()
        finally:
            checkpoints.close()


def hold_commit(monkeypatch, step, action):
    """Patches orbax's commit (the rename of a step's temporary directory) to call action() first, for `step`."""
    from orbax.checkpoint._src.path import atomicity
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def held(self):
        if self.get_final().name == str(step):
            action()
        return await finalize(self)
    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', held)


def test_training_goes_on_while_a_checkpoint_is_written_and_the_end_waits_for_the_last(tmp_path, monkeypatch):
    import threading
    went_on = threading.Event()
    # the commit of step 2 waits until step 4 (index 3) has run: a save that blocked the loop would never see it
    hold_commit(monkeypatch, 2, lambda: went_on.wait(timeout=60))
    count_run(tmp_path, 6, on_step=lambda step: step == 3 and went_on.set())
    assert went_on.is_set()
    assert checkpoint.Checkpoints(tmp_path, read_only=True).all_steps() == [2, 4, 6]   # every save committed


def test_a_failed_background_write_stops_the_run_with_one_line(tmp_path, monkeypatch, caplog):
    def fail():
        raise OSError(28, 'No space left on device')
    hold_commit(monkeypatch, 4, fail)
    steps = []
    with pytest.raises(checkpoint.CheckpointWriteFailed) as error:
        count_run(tmp_path, 100, on_step=steps.append)
    message = str(error.value)
    assert '\n' not in message and 'checkpoint step 4' in message and 'No space left on device' in message
    assert f'newest complete checkpoint: {tmp_path / "checkpoints" / "2"}' in message
    assert len(steps) <= 6      # stopped once the failure is seen: at the latest by the next save (step 6)
    assert not [r for r in caplog.records if r.exc_info]   # orbax's traceback of it is not printed


def test_the_preemption_sync_point_is_asked_once_per_step_with_the_loops_own_numbers(tmp_path, monkeypatch):
    """Several processes agree on a stop through JAX's preemption sync point, which compares a call counter: the loop
    numbers its calls 1, 2, 3, ... in every process (the same whatever step a run resumed from), and nothing else
    asks it (orbax's CheckpointManager would, with step numbers, at each save). Here the sync manager, stood in for,
    answers True at the third call of a resumed run: the loop stops after that step and saves it."""
    from jaxdiff.drivers import loop
    count_run(tmp_path, 4)                               # checkpoints 2 and 4: the run below resumes at step 4
    calls = []

    def reached_sync_point(counter):
        calls.append(counter)
        return len(calls) == 3
    monkeypatch.setattr(loop, 'stop_mechanism', lambda: 'preemption_sync')
    monkeypatch.setattr(loop.multihost_utils, 'reached_preemption_sync_point', reached_sync_point)
    state = count_run(tmp_path, 100)
    assert int(state['step']) == 7                       # steps 5, 6 and 7; the save of step 6 asked nothing
    assert calls == [calls[0], calls[0] + 1, calls[0] + 2]
    assert checkpoint.Checkpoints(tmp_path, read_only=True).latest_step() == 7
