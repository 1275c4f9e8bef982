"""`--mode=sample` reaches every sampler, schedule and option by config (SPEC.md), on workdirs trained by the
commands of the README (reduced sizes): the issue's five commands, each checked against the grid and NFE the library
declares for it."""
import numpy as np
import pytest

from jaxdiff.core import samplers, schedules
from test_cli import assert_one_line_error, run_main

TOY = ['--config=configs/toy2d_edm.py', '--config.training.total_images=2048', '--config.model.hidden_dim=16',
       '--config.model.num_layers=1', '--config.training.sample_every_steps=0', '--config.sampling.num_samples=64',
       '--config.sampling.batch_size=64']
DIGITS = ['--config.model.model_channels=8', '--config.model.channel_mult=(1,2)', '--config.training.batch_size=8',
          '--config.training.total_images=16', '--config.training.sample_every_steps=0',
          '--config.sampling.num_samples=8', '--config.sampling.batch_size=8']


@pytest.fixture(scope='module')
def toy_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp('toy')
    result = run_main(*TOY, f'--workdir={workdir}')
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.mark.parametrize('overrides, sampler, options, schedule, schedule_options', [
    (['--config.sampling.sampler=dpmpp_2m', '--config.sampling.schedule=logsnr'], 'dpmpp_2m', {}, 'logsnr', {}),
    (['--config.sampling.sampler=ddim', '--config.sampling.sampler_options.eta=1.0'], 'ddim', {'eta': 1.0}, 'edm', {}),
    (['--config.sampling.sampler=heun', '--config.sampling.sampler_options.s_churn=10.0'], 'heun',
     {'s_churn': 10.0}, 'edm', {}),
    (['--config.sampling.sampler=gmm_ddim', '--config.sampling.sampler_options.variant=ortho'], 'gmm_ddim',
     {'variant': 'ortho'}, 'edm', {}),
    (['--config.sampling.schedule_options.num_steps=6', '--config.sampling.sampler=ipndm'], 'ipndm', {}, 'edm',
     {'num_steps': 6}),
], ids=['dpmpp_2m-logsnr', 'ddim-eta', 'heun-churn', 'gmm_ddim-ortho', 'ipndm-6'])
def test_sample_command_uses_the_configured_sampler(toy_workdir, overrides, sampler, options, schedule,
                                                    schedule_options):
    result = run_main(*TOY, f'--workdir={toy_workdir}', '--mode=sample', *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    expected_sigmas = schedules.get(schedule, **{'num_steps': 18, 'sigma_min': 0.002, 'sigma_max': 80.0,
                                                 **schedule_options})
    with np.load(toy_workdir / 'samples.npz') as f:
        assert f['samples'].shape == (64, 2) and np.all(np.isfinite(f['samples']))
        np.testing.assert_allclose(f['sigmas'], np.asarray(expected_sigmas), rtol=1e-6)
        assert int(f['nfe']) == samplers.get(sampler, **options).nfe(len(expected_sigmas))
    assert f'({sampler}, {int(np.load(toy_workdir / "samples.npz")["nfe"])} NFE' in result.stdout


def test_an_option_the_sampler_does_not_take_names_it_and_the_valid_ones(toy_workdir):
    result = run_main(*TOY, f'--workdir={toy_workdir}', '--mode=sample', '--config.sampling.sampler=euler',
                      '--config.sampling.sampler_options.eta=1.0')
    assert_one_line_error(result, "no option(s) eta", 'valid options')
    result = run_main(*TOY, f'--workdir={toy_workdir}', '--mode=sample', '--config.sampling.schedule=logsnr',
                      '--config.sampling.schedule_options.rho=3')
    assert_one_line_error(result, "no option(s) rho", 'sigma_max')


def test_digits_amed_predictor_samples_from_the_command_line(tmp_path):
    model, predictor = tmp_path / 'quickstart', tmp_path / 'amed'
    trained = run_main('--config=configs/quickstart.py', f'--workdir={model}', *DIGITS)
    assert trained.returncode == 0, trained.stderr[-3000:]
    amed = run_main('--config=configs/digits_amed.py', f'--workdir={predictor}', '--mode=train_amed', *DIGITS,
                    f'--config.amed.model_workdir={model}', '--config.amed.num_trajectories=8',
                    '--config.amed.batch_size=4')
    assert amed.returncode == 0, amed.stderr[-3000:]
    sampled = run_main('--config=configs/digits_amed.py', f'--workdir={model}', '--mode=sample', *DIGITS,
                       '--config.sampling.sampler=amed', f'--config.sampling.predictor_workdir={predictor}')
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    with np.load(model / 'samples.npz') as f:
        assert f['samples'].shape == (8, 16, 16, 1) and np.all(np.isfinite(f['samples']))
        assert int(f['nfe']) == 5 and f['sigmas'].shape == (4,)     # the predictor's grid: N = 4 with AFS
