"""`--mode=evaluate` (jaxdiff.drivers.evaluation) and `--mode=import_edm`.

- End to end from the command line on a digits workdir: Inception FID / KID with a random-weights file the test
  writes, and the digits metric, in one run (metric=both); the JSON line printed and appended.
- The protocol in-process with a cheap exact feature map: every run's FID equals the FID of the samples the
  Generator makes for that run's batches (EDM's 3 disjoint seed ranges), the minimum is reported, KID and digits FD
  are those of the best run, and an .npz reference (mu, sigma) gives the same FID as the data it was computed from.
- EDM import round trip: a synthetic EDM state dict of a tiny conditional DDPM++ (EDM's names and layouts) ->
  import_edm -> the EMA item equals the network's variables exactly, and `--mode=sample` on the imported workdir
  gives the samples of the jaxdiff network it came from, on EDM's grid clipped to the network's sigma range.
"""
import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from jaxdiff.drivers import checkpoint as checkpoint_lib, config_files, digits_metric, evaluation, fid, sampling, trained as trained_lib
from jaxdiff.core import losses
from jaxdiff.drivers import mesh as mesh_lib, train_step
from jaxdiff.core import schedules
from jaxdiff.convert import edm, inception as convert_inception
from jaxdiff.data import digits as digits_data
from jaxdiff.core.errors import UserError
from jaxdiff.modes import import_edm
from jaxdiff.drivers import edm_import
from conftest import state_dict_from_variables
from test_cli import ROOT, run_main

TINY = {'model.model_channels': 8, 'sampling.batch_size': 4, 'sampling.schedule_options.num_steps': 2}
TINY_FLAGS = ['--config.model.model_channels=8', '--config.sampling.schedule_options.num_steps=2']


def digits_config(**overrides):
    return config_files.load(os.path.join(ROOT, 'configs', 'digits_eval.py'), {**TINY, **overrides})


def random_like(tree, seed):
    """Every leaf drawn at random (a freshly initialised SongUNet's zero output layer would make all samples ~0)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda leaf: (0.2 * rng.normal(size=leaf.shape)).astype(np.float32), tree)


def write_ema_workdir(config, workdir, seed=0):
    """A workdir whose checkpoint 0 holds only an 'ema' item of random weights for config's model."""
    _, modules, _ = trained_lib.networks_of(config)
    params, model_state = jax.eval_shape(
        lambda key: train_step.init_variables(modules, tuple(config.data.shape), key), jax.random.key(0))
    checkpoints = checkpoint_lib.Checkpoints(workdir)
    checkpoints.save(0, None, ema={'params': random_like(params, seed), 'model_state': random_like(model_state, 1)})
    checkpoints.wait_until_finished()
    checkpoints.close()


def quadrant_means(images):
    """A cheap exact feature map: the mean of each image quadrant [N, 4] (float64)."""
    x = np.asarray(images, np.float64)
    h, w = x.shape[1] // 2, x.shape[2] // 2
    return np.stack([x[:, :h, :w].mean((1, 2, 3)), x[:, :h, w:].mean((1, 2, 3)), x[:, h:, :w].mean((1, 2, 3)),
                     x[:, h:, w:].mean((1, 2, 3))], axis=1)


def test_evaluate_end_to_end_fid_kid_and_digits_metric(tmp_path):
    """Slow part: compiles Inception-v3 (batch 8) in the subprocess."""
    workdir, weights = tmp_path / 'run', tmp_path / 'inception_random.npz'
    write_ema_workdir(digits_config(), workdir)
    np.savez(weights, **convert_inception.random_state_dict())
    result = run_main('--config=configs/digits_eval.py', f'--workdir={workdir}', '--mode=evaluate', *TINY_FLAGS,
                      '--config.sampling.batch_size=8', '--config.evaluation.num_samples=8',
                      '--config.evaluation.metric=both', '--config.evaluation.kid_subsets=2',
                      f'--config.evaluation.inception_weights={weights}', '--config.evaluation.feature_batch_size=8',
                      '--config.evaluation.reference_num_examples=8')
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    with open(workdir / 'evaluation.jsonl') as f:
        lines = [json.loads(line) for line in f]
    assert lines == [printed]
    assert printed['num_samples'] == 8 and printed['nfe'] == 3 and printed['checkpoint_step'] == 0
    assert printed['reference'] == 'digits train (8 images)' and printed['inception_weights'] == str(weights)
    for name in ('fid', 'kid', 'kid_std', 'digits_fd', 'digits_kid', 'digits_kid_std', 'digits_data_fd'):
        assert np.isfinite(printed[name]), name
    assert printed['fid'] > 0 and printed['digits_fd'] > printed['digits_data_fd'] > 0
    assert 'evaluating: 8/8 samples' in result.stderr
    caches = [name for name in os.listdir(workdir) if name.startswith('fid_reference_')]
    assert len(caches) == 1
    with np.load(workdir / caches[0]) as cache:
        assert cache['mu'].shape == (2048,) and cache['sigma'].shape == (2048, 2048)
        assert cache['features'].shape == (8, 2048)


@pytest.fixture(scope='module')
def digits16():
    return digits_metric.get(16)


def test_edm_protocol_runs_are_disjoint_seed_ranges_and_the_minimum_is_reported(tmp_path, digits16):
    config = digits_config(**{'evaluation.protocol': 'edm', 'evaluation.num_samples': 6, 'evaluation.metric': 'both',
                              'evaluation.kid_subsets': 3, 'evaluation.kid_subset_size': 5,
                              'evaluation.reference_num_examples': 40})
    write_ema_workdir(config, tmp_path)
    mesh = mesh_lib.make_mesh()
    result = evaluation.evaluate(config, str(tmp_path), mesh, feature_fn=quadrant_means, feature_id=['quadrants'],
                                 digits=digits16)
    # Ground truth: the Generator's samples of batches 2r, 2r + 1 (6 samples in batches of 4) for run r.
    trained = trained_lib.restore(config, str(tmp_path), mesh)
    generator = sampling.generator(config, mesh, trained.denoiser_fn)
    reference_features = quadrant_means(digits_data.Digits(shape=(16, 16, 1), split='train').images[:40])
    reference = fid.RunningStatistics().update(reference_features)
    runs = [generator(trained.variables, 6, first_batch=2 * r) for r in range(3)]
    expected = [fid.frechet_distance(fid.RunningStatistics().update(quadrant_means(x)), reference) for x in runs]
    np.testing.assert_allclose(result['fid_runs'], expected, rtol=1e-9)
    assert len(set(np.round(expected, 12))) == 3                  # disjoint noise: three different FIDs
    best = int(np.argmin(expected))
    assert result['fid'] == result['fid_runs'][best] == min(result['fid_runs'])
    assert [r['first_batch'] for r in result['runs']] == [0, 2, 4]
    # (KID's features are kept in float32, the statistics accumulate in float64)
    kid_mean, kid_std = fid.kid(quadrant_means(runs[best]).astype(np.float32), reference_features.astype(np.float32),
                                num_subsets=3, subset_size=5)
    np.testing.assert_allclose([result['kid'], result['kid_std']], [kid_mean, kid_std], rtol=1e-9)
    np.testing.assert_allclose(result['digits_fd'], digits16.fd(runs[best]), rtol=1e-9)
    assert result['nfe'] == 3 and result['protocol'] == 'edm' and result['num_samples'] == 6
    np.testing.assert_allclose(result['sigmas'], schedules.get('edm', num_steps=2, sigma_min=0.002, sigma_max=80.0),
                               rtol=1e-6)
    with open(tmp_path / 'evaluation.jsonl') as f:
        assert [json.loads(line) for line in f] == [json.loads(json.dumps(result))]
    # An .npz reference (EDM's format: mu, sigma) of the same features gives the same FID as the data.
    npz = tmp_path / 'reference.npz'
    fid.save_statistics(npz, reference)
    single = digits_config(**{'evaluation.num_samples': 6, 'evaluation.reference': str(npz),
                              'evaluation.metric': 'fid', 'evaluation.kid': False})
    result = evaluation.evaluate(single, str(tmp_path), mesh, feature_fn=quadrant_means, feature_id=['quadrants'])
    np.testing.assert_allclose(result['fid'], expected[0], rtol=1e-9)
    assert 'fid_runs' not in result and result['reference'] == str(npz)
    assert 'digits_fd' not in result


def test_evaluation_errors_are_one_line_and_come_before_sampling(tmp_path):
    with pytest.raises(UserError, match=r"config.evaluation.protocol='best'; valid choices: single, edm"):
        evaluation.settings_of(digits_config(**{'evaluation.protocol': 'best'}))
    with pytest.raises(UserError, match='config.evaluation.num_samples=1 must be an integer >= 2'):
        evaluation.settings_of(digits_config(**{'evaluation.num_samples': 1}))
    with pytest.raises(UserError, match=r"must be 'data'"):
        evaluation.settings_of(digits_config(**{'evaluation.reference': 'cifar10-32x32.pkl'}))
    missing = tmp_path / 'absent.pth'   # the workdir has no checkpoint either: the weights are named first
    config = digits_config(**{'evaluation.metric': 'fid', 'evaluation.inception_weights': str(missing)})
    with pytest.raises(UserError) as error:
        evaluation.evaluate(config, str(tmp_path), mesh_lib.make_mesh())
    assert str(missing) in str(error.value) and convert_inception.WEIGHTS_URL in str(error.value)
    npz = tmp_path / 'mu_sigma.npz'
    np.savez(npz, mu=np.zeros(4), sigma=np.eye(4))
    config = digits_config(**{'evaluation.metric': 'fid', 'evaluation.kid': True, 'evaluation.reference': str(npz)})
    with pytest.raises(UserError, match='kid=True needs the reference features'):
        evaluation.evaluate(config, str(tmp_path), mesh_lib.make_mesh(), feature_fn=quadrant_means)
    with pytest.raises(UserError, match=r'needs digits images \[R, R, 1\]'):
        evaluation.digits_metric_for(config_files.named('toy2d_edm'))


DDPMPP_COND = dict(img_resolution=8, in_channels=3, out_channels=3, label_dim=10, augment_dim=9, model_channels=8,
                   channel_mult=(1, 2), channel_mult_emb=2, num_blocks=1, attn_resolutions=(4,), dropout=0.0,
                   label_dropout=0.0, embedding_type='positional', channel_mult_noise=1, encoder_type='standard',
                   decoder_type='standard', resample_filter=(1, 1))


def test_import_edm_round_trip_then_sample(tmp_path):
    model = edm.build_model(DDPMPP_COND)
    variables = random_like(edm.variable_shapes(model), seed=3)
    state_dict = tmp_path / 'edm_state_dict.npz'            # EDM's names / layouts, 'model.' prefix, buffers
    np.savez(state_dict, **state_dict_from_variables(variables, model))
    workdir = tmp_path / 'imported'
    imported = run_main('--config=configs/edm_import.py', f'--workdir={workdir}', '--mode=import_edm',
                        f'--config.edm_import.path={state_dict}', '--config.edm_import.precond=ve',
                        '--config.edm_import.precond_constants.sigma_max=50.0')
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert f'--config=configs/edm_import.py --workdir={workdir} --mode=sample' in imported.stdout
    # The EMA item is the network's variables, exactly, restored through the imported config.
    config = edm_import.resolve(config_files.named('edm_import'), str(workdir))
    assert config.loss.to_dict() == dict(parameterization='ve', target='x0', pairing='independent', sigma_min=0.02,
                                         sigma_max=50.0)
    assert tuple(config.data.shape) == (8, 8, 3) and config.model.label_dim == 10
    assert config.amed.model_workdir == str(workdir) and config.discriminator.model_workdir == str(workdir)
    mesh = mesh_lib.make_mesh()
    trained = trained_lib.restore(config, str(workdir), mesh)
    restored = traverse_util.flatten_dict(trained.variables['params']['model'])
    original = traverse_util.flatten_dict(variables['params'])
    assert set(restored) == set(original) and trained.step == 0
    for path, value in original.items():
        np.testing.assert_array_equal(np.asarray(restored[path]), value, err_msg='/'.join(path))
    # A second import into the same workdir is refused (its checkpoint would be shadowed).
    again = run_main('--config=configs/edm_import.py', f'--workdir={workdir}', '--mode=import_edm',
                     f'--config.edm_import.path={state_dict}', '--config.edm_import.precond=ve')
    assert again.returncode == 2 and 'already holds checkpoints' in again.stderr
    # --mode=sample on the imported workdir = the original network under VE preconditioning, on EDM's grid
    # clipped to the network's range (sigma_min 0.02 > 0.002, sigma_max 50 < 80).
    sampled = run_main('--config=configs/edm_import.py', f'--workdir={workdir}', '--mode=sample',
                       '--config.sampling.num_samples=4', '--config.sampling.batch_size=4',
                       '--config.sampling.schedule_options.num_steps=3')
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    with np.load(workdir / 'samples.npz') as f:
        samples, labels, sigmas = f['samples'], f['labels'], f['sigmas']
    np.testing.assert_allclose(sigmas, schedules.get('edm', num_steps=3, sigma_min=0.02, sigma_max=50.0), rtol=1e-6)
    with config.unlocked():
        config.sampling.num_samples, config.sampling.batch_size = 4, 4
        config.sampling.schedule_options.num_steps = 3
    precond = losses.build(parameterization='ve', target='x0', pairing='independent', sigma_min=0.02,
                           sigma_max=50.0).parameterization.precond
    generator = sampling.generator(config, mesh, trained_lib.denoiser_fn_for(model, precond))
    expected = generator({'params': {'model': variables['params']}, 'model_state': {}}, 4)
    np.testing.assert_array_equal(labels, generator.labels)
    np.testing.assert_allclose(samples, expected, rtol=1e-5, atol=1e-5)
    assert json.load(open(workdir / edm_import.IMPORTED_FILE))['source']['class_name'] == 'VEPrecond'


def test_import_edm_ncsnpp_keeps_its_fourier_frequencies(tmp_path):
    """In-process: NCSN++ (Fourier embedding, residual encoder): params and the stored frequencies (EDM's buffer
    map_noise.freqs, jaxdiff's non-trainable collection) land in the EMA item exactly; EDM's VP constants."""
    fields = dict(DDPMPP_COND, label_dim=0, embedding_type='fourier', channel_mult_noise=2, encoder_type='residual',
                  resample_filter=(1, 3, 3, 1))
    model = edm.build_model(fields)
    shapes = edm.variable_shapes(model)
    if edm._freqs_location(shapes) is None:
        pytest.skip("jaxdiff's SongUNet keeps no Fourier-frequency variable yet")
    variables = random_like(shapes, seed=4)
    state_dict = tmp_path / 'ncsnpp.npz'
    np.savez(state_dict, **state_dict_from_variables(variables, model))
    workdir = str(tmp_path / 'imported')
    config = edm_import.resolve(config_files.named('edm_import'), workdir)
    with config.unlocked():
        config.edm_import.path, config.edm_import.precond = str(state_dict), 'vp'
    import_edm.run(config, workdir)
    config = edm_import.resolve(config_files.named('edm_import'), workdir)
    assert config.model.name == 'ncsnpp' and config.loss.parameterization == 'vp' and config.loss.beta_d == 19.9
    # EDM's VP range: sigma(epsilon_t = 1e-5) ~ 0.001 < 0.002 and sigma(1) ~ 152 > 80: the grid stays 0.002..80
    assert (config.sampling.schedule_options.sigma_min, config.sampling.schedule_options.sigma_max) == (0.002, 80.0)
    trained = trained_lib.restore(config, workdir, mesh_lib.make_mesh())
    restored = traverse_util.flatten_dict({'params': trained.variables['params']['model'],
                                           **trained.variables['model_state']})
    original = traverse_util.flatten_dict(variables)
    assert set(restored) == set(original)
    assert any(collection != 'params' for collection, *_ in original)
    for path, value in original.items():
        np.testing.assert_array_equal(np.asarray(restored[path]), value, err_msg='/'.join(path))
