"""What a user's run does when something goes wrong, through the real command (`python -m jaxdiff.main`): a corrupt
newest checkpoint is skipped (never deleted), a changed model, bad config values, a missing config file and a second
process in the same workdir are each one `error:` line with exit code 2 and no traceback. The discriminator trainer
runs on the same loop (drivers/loop.py): SIGTERM saves and stops, a resumed run is bit-identical, a corrupt newest
checkpoint is set aside for the one before. A run killed with kill -9 at any point of an asynchronous save (before,
during and after its write) starts again from its newest committed checkpoint, the leftover removed with one line.

This file is also the kill worker: `python tests/test_faults.py kill_worker POINT WORKDIR` (`kill_worker`)."""
import glob
import os
import signal
import subprocess
import sys
import time

# ---------------------------------------------------------------- kill -9 during an asynchronous save
# (first in the file: the kill worker needs none of the imports below)

KILL_STEPS, KILL_EVERY, KILLED_STEP = 8, 2, 4   # checkpoints 2, 4, 6, 8; the save of step 4 is interrupted
KILL_POINTS = ('before', 'during', 'after')


def toy_step():
    import jax
    return jax.jit(lambda state, batch: {'w': state['w'] * 0.9 + batch, 'step': state['step'] + 1})


def toy_batch(step):
    import numpy as np
    return np.random.default_rng(step).normal(size=(256, 256)).astype(np.float32)


def toy_run(workdir, num_steps=KILL_STEPS):
    """A small deterministic run on the loop skeleton (drivers/loop.py): state {'w': [256, 256], 'step'}, step s
    adds the data of s; asynchronous checkpoints every 2 steps (keeping 3); resumes from the newest committed one.
    Returns (first step, final state on the host)."""
    import jax
    import jax.numpy as jnp
    from jaxdiff.drivers import checkpoint as checkpoint_lib, loop
    checkpoints = checkpoint_lib.Checkpoints(workdir, keep_checkpoints=3)
    init = lambda: {'w': jnp.zeros((256, 256), jnp.float32), 'step': jnp.zeros((), jnp.int32)}
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    step = toy_step()
    try:
        start, state = loop.restore_or_init(checkpoints, checkpoint_lib.abstract_like(jax.eval_shape(init), sharding),
                                            init)
        state = loop.run(state, start=start, num_steps=num_steps, step_fn=lambda state, s, batch: step(state, batch),
                         batch_fn=toy_batch, cadence={loop.CHECKPOINT: KILL_EVERY}, checkpoints=checkpoints,
                         items=lambda state: {'state': state, 'ema': {'w': state['w']}})
    finally:
        checkpoints.wait_until_finished()
        checkpoints.close()
    return start, jax.device_get(state)


def kill_worker(point, workdir):
    """toy_run, killed (SIGKILL, from orbax's threads) at `point` of the save of step KILLED_STEP: 'before' its
    temporary directory has anything in it, 'during' (an item's arrays written, nothing committed), 'after' (the
    step just renamed into place, orbax's bookkeeping after it not done)."""
    from orbax.checkpoint._src.path import atomicity    # the hooks: orbax's atomic-rename commit
    temporary = atomicity.AtomicRenameTemporaryPath
    create, finalize = temporary.create, temporary.finalize
    step_dir = os.path.join(os.path.abspath(workdir), 'checkpoints', str(KILLED_STEP))
    kill = lambda: os.kill(os.getpid(), signal.SIGKILL)

    async def create_then_kill(self):
        path = await create(self)
        if point == 'before' and str(self.get_final()) == step_dir:
            kill()
        return path

    async def finalize_with_kill(self):
        if point == 'during' and str(self.get()).startswith(step_dir + '.'):   # an item inside the step's tmp dir
            kill()
        result = await finalize(self)
        if point == 'after' and str(self.get_final()) == step_dir:
            kill()
        return result
    temporary.create, temporary.finalize = create_then_kill, finalize_with_kill
    toy_run(workdir)


if __name__ == '__main__' and sys.argv[1:2] == ['kill_worker']:
    kill_worker(sys.argv[2], sys.argv[3])
    sys.exit(f'{sys.argv[2]}: the run was not killed')

import jax
import ml_collections
import numpy as np
import pytest

from configs import dg_common
from jaxdiff import data
from jaxdiff.drivers import checkpoint, discriminator_training as dt, mesh as mesh_lib
from test_cli import ROOT, assert_one_line_error, run_main
from test_train import SignalAt, leaves_equal

TINY = ['--config=configs/toy2d_edm.py', '--config.training.batch_size=64', '--config.model.hidden_dim=16',
        '--config.model.num_layers=1', '--config.training.log_every_steps=4', '--config.training.sample_every_steps=0',
        '--config.training.checkpoint_every_steps=4', '--config.sampling.num_samples=64',
        '--config.sampling.batch_size=64']


def steps(n):
    return f'--config.training.total_images={64 * n}'


def assert_clean(result):
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]


def truncate_array_files(step_dir):
    """Truncates every array-data file (orbax's ocdbt `d/` files) of each item ('state' for resuming, 'ema' for
    sampling) to half its size. (Truncating only the largest file of each was not always enough: in one clean-clone
    run training resumed from the step so truncated.)"""
    for item in ('state', 'ema'):
        files = [f for f in glob.glob(os.path.join(step_dir, item, '**', 'd', '*'), recursive=True)
                 if os.path.isfile(f)]
        assert files, f'no array files under {step_dir}/{item}'
        for path in files:
            with open(path, 'r+b') as f:
                f.truncate(os.path.getsize(path) // 2)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A toy2d workdir trained 8 steps (checkpoints 4 and 8)."""
    workdir = tmp_path_factory.mktemp('trained')
    result = run_main(*TINY, f'--workdir={workdir}', steps(8))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_corrupt_newest_checkpoint_is_skipped_and_kept(tmp_path, trained):
    workdir = tmp_path / 'w'
    subprocess.run(['cp', '-r', str(trained), str(workdir)], check=True)
    truncate_array_files(str(workdir / 'checkpoints' / '8'))
    sampled = run_main(*TINY, f'--workdir={workdir}', '--mode=sample')
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert_clean(sampled)
    skipped = [line for line in sampled.stderr.splitlines() if line.startswith('skipping checkpoint')]
    assert len(skipped) == 1 and str(workdir / 'checkpoints' / '8') in skipped[0], sampled.stderr
    with np.load(workdir / 'samples.npz') as f:
        assert int(f['step']) == 4
    resumed = run_main(*TINY, f'--workdir={workdir}', steps(12))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_clean(resumed)
    assert f'resuming from {workdir / "checkpoints"}/4' in resumed.stdout
    assert any(str(workdir / 'checkpoints' / '8') in line for line in resumed.stderr.splitlines())
    kept = glob.glob(str(workdir / 'unreadable_checkpoints' / '8*'))
    assert kept, 'the unreadable checkpoint must be kept'
    assert os.path.isdir(workdir / 'checkpoints' / '12')


def test_resuming_with_a_changed_model_names_the_array_and_the_field(trained):
    result = run_main(*TINY, f'--workdir={trained}', steps(12), '--config.model.hidden_dim=32')
    assert_one_line_error(result, 'shape', 'config.model')
    assert_clean(result)


@pytest.mark.parametrize('override, fragment', [
    ('--config.training.batch_size=0', 'config.training.batch_size=0 must be an integer >= 1'),
    ('--config.training.lr=-0.001', 'config.training.lr=-0.001 must be > 0'),
    ('--config.augment.p=1.5', 'config.augment.p=1.5'),
])
def test_bad_config_values_are_one_line_errors(tmp_path, override, fragment):
    result = run_main(*TINY, f'--workdir={tmp_path}', steps(2), override)
    assert_one_line_error(result, fragment)
    assert_clean(result)


def test_a_missing_config_file_is_one_line(tmp_path):
    result = run_main('--config=configs/nosuch.py', f'--workdir={tmp_path}')
    assert_one_line_error(result, 'configs/nosuch.py')
    assert_clean(result)


def test_a_second_process_in_the_same_workdir_refuses_and_a_stale_lock_is_taken_over(tmp_path):
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
    long_run = subprocess.Popen([sys.executable, '-m', 'jaxdiff.main', *TINY, f'--workdir={tmp_path}', steps(10 ** 6)],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = tmp_path / 'train.lock'
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (lock.exists() and f'pid {long_run.pid}' in lock.read_text()):
            time.sleep(0.5)
        assert f'pid {long_run.pid}' in lock.read_text()
        second = run_main(*TINY, f'--workdir={tmp_path}', steps(4))
        assert_one_line_error(second, str(lock), f'pid {long_run.pid}')
        assert_clean(second)
    finally:
        long_run.send_signal(signal.SIGKILL)
        long_run.wait(timeout=60)
    taken_over = run_main(*TINY, f'--workdir={tmp_path}', steps(4))   # the lock file stays; its holder is gone
    assert taken_over.returncode == 0, taken_over.stderr[-3000:]


# ---------------------------------------------------------------- the discriminator trainer

def train_discriminator(workdir, num_steps, source=None):
    """A small MLP discriminator on eight_gaussians vs a wider Gaussian, checkpoints every 2 steps (keeps 2)."""
    config = ml_collections.ConfigDict()
    config.data = dict(name='eight_gaussians', shape=(2,))
    config.discriminator = dg_common.discriminator(
        model_workdir=None, network=dict(name='mlp', hidden_dim=16, num_layers=1, embedding_dim=8),
        num_generated=256, num_heldout=32, batch_size=32, num_steps=num_steps, log_every_steps=2,
        eval_every_steps=4, checkpoint_every_steps=2, keep_checkpoints=2)
    real = data.build(config.data)
    generated = 1.5 * np.asarray(jax.random.normal(jax.random.key(1), (288, 2)))
    rows = lambda points: {'image': points, 'label': np.zeros(len(points), np.int32)}
    heldout = {'real': dt.heldout_real(config.data, real, 32), 'generated': rows(generated[256:])}
    return dt.train(config, str(workdir), real_source=real if source is None else source, heldout=heldout,
                    generated=rows(generated[:256]), mesh=mesh_lib.make_mesh(jax.devices()[:1]))


@pytest.fixture(scope='module')
def discriminator_8_steps(tmp_path_factory):
    return jax.device_get(train_discriminator(tmp_path_factory.mktemp('discriminator'), 8))


def test_discriminator_sigterm_saves_and_the_resumed_run_is_bit_identical(tmp_path, discriminator_8_steps):
    source = SignalAt(data.build(dict(name='eight_gaussians')), step=3)
    interrupted = train_discriminator(tmp_path, 8, source=source)
    stopped_at = int(interrupted.step)
    assert 1 <= stopped_at < 8
    assert checkpoint.Checkpoints(tmp_path).latest_step() == stopped_at   # saved on SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL             # the handler is removed after training
    resumed = train_discriminator(tmp_path, 8)
    assert int(resumed.step) == 8
    assert leaves_equal(resumed, discriminator_8_steps)


def test_discriminator_corrupt_newest_checkpoint_is_set_aside_and_resumed_from_the_one_before(
        tmp_path, capsys, discriminator_8_steps):
    train_discriminator(tmp_path, 6)                     # checkpoints 4 and 6 kept
    truncate_array_files(str(tmp_path / 'checkpoints' / '6'))
    resumed = train_discriminator(tmp_path, 8)
    out, err = capsys.readouterr()
    assert f'resuming from {tmp_path / "checkpoints"}/4' in out
    skipped = [line for line in err.splitlines() if line.startswith('skipping checkpoint')]
    assert len(skipped) == 1 and str(tmp_path / 'checkpoints' / '6') in skipped[0], err
    assert glob.glob(str(tmp_path / 'unreadable_checkpoints' / '6*')), 'the unreadable checkpoint must be kept'
    assert int(resumed.step) == 8 and leaves_equal(resumed, discriminator_8_steps)


# ---------------------------------------------------------------- kill -9 during an asynchronous save

@pytest.fixture(scope='module')
def killed(tmp_path_factory):
    """{point: workdir of a toy_run killed at that point of its save of step 4} (the workers run at once)."""
    root = tmp_path_factory.mktemp('killed')
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_NUM_CPU_DEVICES': '1', 'PYTHONPATH': ROOT}
    env['XLA_FLAGS'] = ' '.join(f for f in env.get('XLA_FLAGS', '').split() if 'device_count' not in f)
    workers = {point: subprocess.Popen([sys.executable, os.path.abspath(__file__), 'kill_worker', point,
                                        str(root / point)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True) for point in KILL_POINTS}
    for point, worker in workers.items():
        output = worker.communicate(timeout=300)[0]
        assert worker.returncode == -signal.SIGKILL, f'{point}: exit {worker.returncode}\n{output[-3000:]}'
    return {point: root / point for point in KILL_POINTS}


def toy_reference(num_steps):
    state = {'w': np.zeros((256, 256), np.float32), 'step': np.zeros((), np.int32)}
    step = toy_step()
    for s in range(num_steps):
        state = step(state, toy_batch(s))
    return jax.device_get(state)


@pytest.mark.parametrize('point', KILL_POINTS)
def test_kill_9_during_an_asynchronous_save_resumes_from_the_newest_committed_checkpoint(killed, point, capsys):
    workdir = killed[point]
    directory = workdir / 'checkpoints'
    committed = [2, 4] if point == 'after' else [2]   # the step being saved counts once it is renamed into place
    assert checkpoint.Checkpoints(workdir, read_only=True).all_steps() == committed
    leftovers = sorted(os.path.basename(p) for p in glob.glob(str(directory / '*.orbax-checkpoint-tmp*')))
    assert leftovers == ([] if point == 'after' else [f'{KILLED_STEP}.orbax-checkpoint-tmp'])

    start, final = toy_run(workdir)
    out, err = capsys.readouterr()
    assert start == committed[-1] and f'resuming from {directory}/{start}' in out   # nothing committed is lost
    removed = [line for line in err.splitlines() if line.startswith('removing')]
    assert len(removed) == len(leftovers), err
    if leftovers:
        assert leftovers[0] in removed[0] and str(directory) in removed[0]
    assert not glob.glob(str(directory / '*.orbax-checkpoint-tmp*'))                 # removed before the saves
    assert checkpoint.Checkpoints(workdir, read_only=True).all_steps() == [4, 6, 8]
    assert leaves_equal(final, toy_reference(KILL_STEPS))                              # as if never killed
