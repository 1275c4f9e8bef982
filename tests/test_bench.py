"""The truth-problem registry (exact moments, modes, float64 twins, per-problem noise) and the one benchmark entry
(`--mode=bench`, config.bench.name -> jaxdiff/bench/NAME.py), each table on a tiny configuration."""
import csv
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.drivers import config_files
from jaxdiff.bench import problems
from jaxdiff.core.errors import UserError
from jaxdiff.modes import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ('mixture_2d', 'gmm_16x16', 'mixture_4x4x3', 'mixture_4d', 'eight_gaussians', 'separated_mixture')


def test_ids_are_distinct_and_key_distinct_noise():
    ids = [problem_id for problem_id, _ in problems.REGISTRY.values()]
    assert len(set(ids)) == len(ids)
    keys = {name: tuple(np.asarray(jax.random.key_data(problems.get(name).noise_key(0))).ravel())
            for name in problems.names()}
    assert len(set(keys.values())) == len(keys)
    # the solver table's three problems keep the noise they had (keyed on len(name) before the registry)
    for name in ('mixture_2d', 'gmm_16x16', 'digits'):
        old = jax.random.fold_in(jax.random.key(3), len(name))
        np.testing.assert_array_equal(jax.random.key_data(problems.get(name).noise_key(3)),
                                      jax.random.key_data(old))


@pytest.mark.parametrize('name', SMALL)
def test_mixture_moments_and_modes_are_exact(name):
    problem = problems.get(name)
    mean, cov = problem.moments()
    # far from the data the posterior is the prior: D(x, sigma) -> E[x0] (error O(1 / sigma^2))
    x = jnp.zeros((1,) + problem.shape)
    np.testing.assert_allclose(np.asarray(problem.denoiser(x, 1e3)).ravel(), mean, atol=1e-4)
    samples = np.asarray(problem.exact_samples(jax.random.key(0), 20_000), np.float64).reshape(20_000, -1)
    assert np.abs(np.cov(samples.T, bias=True) - cov).max() < 0.05 * np.abs(cov).max()
    target = problem.target()
    if name in ('separated_mixture', 'gmm_16x16', 'mixture_2d', 'eight_gaussians'):    # well-separated modes
        np.testing.assert_array_equal(problem.mode_of(target.means), np.arange(target.means.shape[0]))
    np.testing.assert_allclose(problem.mode_weights.sum(), 1.0, rtol=1e-6)


def test_float64_twin_and_the_digits_set():
    problem = problems.get('digits')                                   # all 1797 images, 8x8, sklearn's order
    from sklearn.datasets import load_digits
    np.testing.assert_array_equal(problem.data()[..., 0], load_digits().images / 8.0 - 1.0)
    assert problem.mode_of(problem.data()[:50]).tolist() == load_digits().target[:50].tolist()
    with pytest.raises(ValueError, match='enable_x64'):
        problem.target(jnp.float64)
    with jax.enable_x64(True):
        twin = problems.get('mixture_2d').target(jnp.float64)
        x = jax.random.normal(jax.random.key(0), (16, 2), jnp.float64) * 2
        exact = twin.denoiser(x, 0.7)
        assert exact.dtype == jnp.float64
        np.testing.assert_allclose(problems.get('mixture_2d').denoiser(x.astype(jnp.float32), 0.7), exact,
                                   rtol=1e-5, atol=1e-5)
    assert problems.get('digits', shape=(16, 16, 1), split='train').data().shape == (1500, 16, 16, 1)
    with pytest.raises(UserError, match='valid problems'):
        problems.get('nope')
    with pytest.raises(UserError, match='valid options: shape, split'):
        problems.get('digits', size=3)


def test_bench_mode_names_its_tables():
    config = config_files.named('bench_solvers')
    config.bench.name = 'nope'
    with pytest.raises(UserError, match='valid: solvers, gmm_ddim, amed'):
        bench.run(config, '/tmp/unused')


def test_solver_table_with_amed_rows_and_the_convergence_table(tmp_path):
    config = config_files.named('bench_solvers')
    config.bench.update(problems=('mixture_2d',), solvers=('heun', 'dpmpp_3m', 'dpmpp_3m_3rd'), nfes=(4, 5),
                        reference_tol=1e-6, amed_rows=True)
    config.bench.num_samples.mixture_2d = 64
    config.bench.amed.update(num_trajectories=32, batch_size=32, methods=('AMED-Solver',))
    config.bench.convergence.steps = (9, 18)
    rows, convergence = bench.run(config, str(tmp_path))
    cells = {(r['solver'], r['nfe']) for r in rows}
    # heun reaches odd NFE only (2 (N - 2) + 1), dpmpp_3m every NFE, AMED with AFS on odd NFE
    assert cells == {('reference', 0), ('heun', 5), ('dpmpp_3m', 4), ('dpmpp_3m', 5), ('dpmpp_3m_3rd', 4),
                     ('dpmpp_3m_3rd', 5), ('amed', 4), ('amed', 5)}
    assert all(np.isfinite(r['rmse']) and r['fd'] > 0 for r in rows)
    with open(tmp_path / 'bench_solvers.csv') as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    by = {(r['solver'], r['steps']): r['rel_error'] for r in convergence}
    assert set(by) == {(s, n) for s in ('dpmpp_3m', 'dpmpp_3m_3rd') for n in (9, 18)}
    assert all(0 < e < 1 for e in by.values()) and by[('dpmpp_3m', 18)] < by[('dpmpp_3m', 9)]
    assert (tmp_path / 'bench_solvers_convergence.csv').exists() and (tmp_path / 'bench_solvers.png').exists()


def test_amed_table(tmp_path):
    config = config_files.named('bench_amed')
    config.bench.update(problems=('mixture_4x4x3',), methods=('AMED-Solver',), nfes=(3,), num_trajectories=32,
                        batch_size=32, num_eval=16)
    bench.run(config, str(tmp_path))
    rows = json.loads((tmp_path / 'bench_amed.json').read_text())
    assert [r['method'] for r in rows] == ['DPM-Solver-2', 'iPNDM', 'DPM-Solver++(3M)', 'AMED-Solver']
    assert all(r['nfe'] == 3 and 0 < r['error'] < 10 for r in rows)


def test_the_command_line_entry(tmp_path):
    """`python -m jaxdiff.main --mode=bench` reaches the table named by the config (the GMM-DDIM one, tiny)."""
    command = [sys.executable, '-m', 'jaxdiff.main', '--mode=bench', '--config=configs/bench_gmm_ddim.py',
               f'--workdir={tmp_path}', '--config.bench.problems=("separated_mixture",)',
               '--config.bench.methods=("ddim",)', '--config.bench.steps=(3,)', '--config.bench.etas=(0.0,)',
               '--config.bench.num_seeds=2', '--config.bench.num_samples=32', '--config.bench.num_projections=8',
               '--config.bench.problem_options.separated_mixture.shape=(2,2,3)']
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    with open(tmp_path / 'bench_gmm_ddim.csv') as f:
        assert len(list(csv.DictReader(f))) == 2 + 2      # exact floor and ddim, two seeds each
