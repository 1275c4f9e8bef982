"""`python -m jaxdiff.main` as a user runs it: one-line errors (exit code 2) and `--mode=sample` output files."""
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args):
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
    return subprocess.run([sys.executable, '-m', 'jaxdiff.main', *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def assert_one_line_error(result, *fragments):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize('override, fragments', [
    ('--config.training.batch_size=12', ('training.batch_size=12', '(8)')),
    ('--config.data.name=mnist', ("'mnist'", 'digits')),
    ('--config.model.name=resnet', ("'resnet'", 'ddpmpp')),
])
def test_bad_config_is_a_one_line_error(tmp_path, override, fragments):
    result = run_main('--config=configs/toy2d_edm.py', f'--workdir={tmp_path}', override)
    assert_one_line_error(result, *fragments)


def test_sample_without_checkpoint_is_a_one_line_error_naming_the_path(tmp_path):
    result = run_main('--config=configs/toy2d_edm.py', f'--workdir={tmp_path}', '--mode=sample')
    assert_one_line_error(result, str(tmp_path / 'checkpoints'))


def test_train_then_sample_writes_the_files(tmp_path):
    common = ['--config=configs/toy2d_edm.py', f'--workdir={tmp_path}', '--config.training.total_images=2048',
              '--config.training.batch_size=256', '--config.model.hidden_dim=16', '--config.model.num_layers=1',
              '--config.sampling.num_samples=100', '--config.sampling.batch_size=40']
    trained = run_main(*common)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert 'step 8/8' in trained.stdout
    assert os.path.exists(tmp_path / 'checkpoints' / '8') and os.path.exists(tmp_path / 'metrics.jsonl')
    sampled = run_main(*common, '--mode=sample')
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    with np.load(tmp_path / 'samples.npz') as f:
        assert f['samples'].shape == (100, 2) and np.all(np.isfinite(f['samples']))
        assert int(f['nfe']) == 35 and int(f['step']) == 8 and f['sigmas'].shape == (19,)
    assert os.path.getsize(tmp_path / 'samples.png') > 0
