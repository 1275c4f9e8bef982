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


def test_unknown_config_field_is_a_one_line_error_listing_the_valid_ones(tmp_path):
    result = run_main('--config=configs/toy2d_edm.py', f'--workdir={tmp_path}', '--mode=sample',
                      '--config.sampling.num_steps=10')
    assert_one_line_error(result, 'unknown config field sampling.num_steps; valid fields of config.sampling: ',
                          'schedule_options')


def test_overrides_are_parsed_in_one_place():
    """jaxdiff.drivers.overrides: every --config.PATH comes off argv; closed fields get absl's types, open option
    dicts take any key; unknown fields and bad values are UserErrors naming them."""
    from jaxdiff.core.errors import UserError
    from jaxdiff.drivers import config_files, overrides
    config = config_files.named('toy2d_edm')
    config.lock()
    argv, found = overrides.split(['jaxdiff', '--config=configs/toy2d_edm.py', '--config.training.lr=-0.001',
                                   '--config.data.shape=(2,)', '--workdir=w', '--config.distributed.initialize',
                                   '--config.training.batch_size', '8', '--config.sampling.sampler_options.eta=1.0',
                                   '--config.sampling.schedule_options.rho=3', '--config.sampling.sampler=ddim',
                                   '--config.sampling.guidance.name=discriminator'])
    assert argv == ['jaxdiff', '--config=configs/toy2d_edm.py', '--workdir=w']
    overrides.apply(config, found)
    assert config.training.lr == -0.001 and tuple(config.data.shape) == (2,) and config.distributed.initialize
    assert config.training.batch_size == 8 and config.sampling.sampler == 'ddim'
    assert dict(config.sampling.sampler_options) == {'eta': 1.0} and config.sampling.schedule_options.rho == 3
    assert config.sampling.schedule_options.num_steps == 18 and dict(config.sampling.guidance) == {
        'name': 'discriminator'}
    for args, message in [(['--config.sampling.num_steps=10'], 'unknown config field sampling.num_steps; valid '
                                                                'fields of config.sampling: batch_size, '),
                          (['--config.trainig.lr=1'], 'valid fields of config: augment, data'),
                          (['--config.training.batch_size=abc'], 'flag --config.training.batch_size=abc: '),
                          (['--config.sampling.sampler_options.a.b=1'], 'single names')]:
        with pytest.raises(UserError, match=message):
            overrides.apply(config, overrides.split(['jaxdiff', *args])[1])


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
