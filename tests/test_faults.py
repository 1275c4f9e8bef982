"""What a user's run does when something goes wrong, through the real command (`python -m jaxdiff.main`): a corrupt
newest checkpoint is skipped (never deleted), a changed model, bad config values, a missing config file and a second
process in the same workdir are each one `error:` line with exit code 2 and no traceback."""
import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from test_cli import ROOT, assert_one_line_error, run_main

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
    ('--config.training.batch_size=0', 'config.training.batch_size=0 must be >= 1'),
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
