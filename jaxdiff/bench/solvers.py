"""Truth benchmark of the fixed-grid solvers (configs/bench_solvers.py holds the command).

For each truth problem (`bench.problems`: by default a 2-D Gaussian mixture, a 16x16 Gaussian mixture with
well-separated modes, an overlapping 4-D mixture, the empirical distribution of scikit-learn's digits), every solver runs from the same x_T on EDM
grids whose length gives exactly the requested NFE (`sampler.num_points_for(nfe)`, the sampler's own declaration,
checked against the `info['nfe']` of the run; NFE that no grid reaches are skipped) and is scored by
  - rmse: endpoint RMSE against a float64 adaptive reference solve of the same ODE from the same x_T
          (`analytic.reference_solve`), i.e. the discretisation error of the flow map;
  - fd:   Frechet distance (float64) between the samples and exact samples of the data distribution.
A row 'reference' gives the reference solve's own FD: the floor set by the finite sample size.
x_T and the exact samples come from the problem's noise key (`problem.noise_key(seed)`), distinct per problem.

AMED rows (`bench.amed_rows=True`): AMED-Solver and AMED-Plugin(iPNDM) at every NFE 3..10 of the list, each
predictor trained against the problem's exact denoiser (`bench.amed.truth_rows`, options in `bench.amed`).

Convergence table (`bench.convergence`): for the listed solvers, the endpoint error relative to the reference,
|x - x_ref| / |x_ref| over the whole batch, in float64 (the float64 twin denoiser, x_T in float64) on EDM grids of the
listed step counts; it compares the two DPM-Solver++(3M) forms (samplers/multistep.py).

Output: a printed table per problem and metric, WORKDIR/bench_solvers.csv, WORKDIR/bench_solvers.png and
WORKDIR/bench_solvers_convergence.csv.
"""
import csv
import dataclasses
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.core import analytic, metrics, samplers, schedules
from jaxdiff.bench import problems as problems_lib
from jaxdiff.core.errors import UserError

# label -> (sampler name, options)
SOLVERS = {
    'euler': ('euler', {}),
    'heun': ('heun', {}),
    'heun+afs': ('heun', {'afs': True}),
    'dpm2': ('dpm2', {}),
    'dpm2+afs': ('dpm2', {'afs': True}),
    'dpmpp_2m': ('dpmpp_2m', {}),
    'dpmpp_3m': ('dpmpp_3m', {}),
    'dpmpp_3m_3rd': ('dpmpp_3m', {'form': 'third_order'}),
    'ipndm': ('ipndm', {}),
    'ipndm+afs': ('ipndm', {'afs': True}),
}


@dataclasses.dataclass
class Problem:
    """A truth problem set up for this table: its start noise, reference endpoints and exact samples."""
    truth: problems_lib.Problem
    denoiser: Callable              # float32 exact denoiser the solvers use
    x_T: jax.Array                  # [n, ...] float32 start samples, sigma_max * N(0, I)
    reference: np.ndarray           # float64 reference-solve endpoints from the same x_T
    exact_samples: np.ndarray       # samples of the data distribution (for the Frechet distance)
    sigma_min: float
    sigma_max: float
    rho: float

    @property
    def name(self):
        return self.truth.name


def sampler_for(label):
    name, options = SOLVERS[label]
    return samplers.get(name, **options)


def steps_for(label, nfe):
    """Number of EDM steps (grid ending at 0) at which solver `label` spends exactly `nfe` calls, or None."""
    try:
        return sampler_for(label).num_points_for(nfe) - 1
    except ValueError:
        return None


def build_problem(name, num_samples, seed, sigma_min, sigma_max, rho, reference_tol, options=None):
    truth = problems_lib.get(name, **dict(options or {}))
    key_x, key_exact = jax.random.split(truth.noise_key(seed))
    x_T = jax.random.normal(key_x, (num_samples,) + truth.shape, jnp.float32) * sigma_max
    with jax.enable_x64(True):
        reference = analytic.reference_solve(truth.target(jnp.float64).denoiser, jnp.asarray(x_T, jnp.float64),
                                             sigma_max, 0.0, rtol=reference_tol, atol=reference_tol)
        reference = np.asarray(reference, np.float64)
    exact = truth.data() if not truth.is_mixture else np.asarray(truth.exact_samples(key_exact, num_samples))
    return Problem(truth, truth.denoiser, x_T, reference, exact, sigma_min, sigma_max, rho)


def edm_grid(problem, steps):
    return schedules.get('edm', num_steps=steps, sigma_min=problem.sigma_min, sigma_max=problem.sigma_max,
                         rho=problem.rho)


def fixed_grid_rows(problem, nfes, labels):
    """(label, nfe, samples) for every solver and reachable NFE; checks the run's NFE == the declared one."""
    for label in labels:
        sampler = sampler_for(label)
        run = jax.jit(lambda x, s, sampler=sampler: sampler(problem.denoiser, x, s))
        for nfe in nfes:
            steps = steps_for(label, nfe)
            if steps is None:
                continue
            samples, info = run(problem.x_T, edm_grid(problem, steps))
            if int(info['nfe']) != nfe:
                raise AssertionError(f'{label}: {steps} steps report NFE {int(info["nfe"])}, declared {nfe}')
            yield label, nfe, samples


def score(problem, label, nfe, samples):
    samples = np.asarray(samples, np.float64)
    if not np.all(np.isfinite(samples)):                          # a diverged solver: reported, not fatal
        return {'problem': problem.name, 'solver': label, 'nfe': nfe, 'rmse': np.nan, 'fd': np.nan}
    rmse = float(np.sqrt(np.mean((samples - problem.reference) ** 2)))
    return {'problem': problem.name, 'solver': label, 'nfe': nfe, 'rmse': rmse,
            'fd': metrics.frechet_distance(samples, problem.exact_samples)}


def convergence_rows(problem, labels, steps_list):
    """{problem, solver, steps, nfe, rel_error}: float64 solves on EDM grids of `steps_list` steps, endpoint error
    |x - x_ref| / |x_ref| against the reference solve (module docstring)."""
    rows = []
    with jax.enable_x64(True):
        denoiser = problem.truth.target(jnp.float64).denoiser
        x_T = jnp.asarray(problem.x_T, jnp.float64)
        for label in labels:
            sampler = sampler_for(label)
            for steps in steps_list:
                out, info = sampler(denoiser, x_T, edm_grid(problem, steps))
                error = np.linalg.norm(np.asarray(out) - problem.reference) / np.linalg.norm(problem.reference)
                rows.append({'problem': problem.name, 'solver': label, 'steps': steps, 'nfe': int(info['nfe']),
                             'rel_error': float(error)})
    return rows


def print_table(rows, problem_name, metric, nfes):
    labels = list(dict.fromkeys(r['solver'] for r in rows if r['problem'] == problem_name))
    cell = {(r['solver'], r['nfe']): r[metric] for r in rows if r['problem'] == problem_name}
    print(f'\n{problem_name}: {metric} (rows: solver, columns: NFE)')
    print(f'{"solver":<13}' + ''.join(f'{n:>10}' for n in nfes))
    for label in labels:
        if label == 'reference':
            print(f'{"reference":<13}{cell[("reference", 0)]:>10.3g}   (float64 adaptive solve: the sample-size floor)')
            continue
        print(f'{label:<13}' + ''.join(f'{cell[(label, n)]:>10.3g}' if (label, n) in cell else f'{"-":>10}'
                                       for n in nfes))


def print_convergence(rows, problem_name, steps_list):
    mine = [r for r in rows if r['problem'] == problem_name]
    if not mine:
        return
    cell = {(r['solver'], r['steps']): r['rel_error'] for r in mine}
    print(f'\n{problem_name}: endpoint error relative to the reference, float64, EDM grid (columns: steps = NFE)')
    print(f'{"solver":<13}' + ''.join(f'{n:>10}' for n in steps_list))
    for label in dict.fromkeys(r['solver'] for r in mine):
        print(f'{label:<13}' + ''.join(f'{cell[(label, n)]:>10.3g}' for n in steps_list))


def plot(rows, problem_names, path, nfes):
    import matplotlib
    import matplotlib.ticker
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, len(problem_names), figsize=(5 * len(problem_names), 8), squeeze=False)
    for col, problem in enumerate(problem_names):
        for row, metric in enumerate(('rmse', 'fd')):
            ax = axes[row, col]
            mine = [r for r in rows if r['problem'] == problem]
            for label in dict.fromkeys(r['solver'] for r in mine if r['solver'] != 'reference'):
                points = sorted((r['nfe'], r[metric]) for r in mine if r['solver'] == label)
                ax.plot(*zip(*points), marker='o', label=label)
            floor = [r[metric] for r in mine if r['solver'] == 'reference']
            if metric == 'fd' and floor:
                ax.axhline(floor[0], color='k', ls='--', label='reference')
            ax.set(xscale='log', yscale='log', xlabel='NFE', ylabel=metric, title=f'{problem}: {metric}')
            ax.set_xticks(nfes, [str(n) for n in nfes], fontsize=7)
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.grid(True, which='both', alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _write_csv(path, rows):
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def run(config, workdir):
    if not workdir:
        raise UserError('--workdir is required for the solver benchmark (CSV and PNG are written there)')
    b = config.bench
    unknown = [label for label in list(b.solvers) + list(b.convergence.solvers) if label not in SOLVERS]
    if unknown:
        raise UserError(f'bench.solvers: unknown {", ".join(unknown)}; valid: {", ".join(SOLVERS)}')
    os.makedirs(workdir, exist_ok=True)
    nfes = tuple(int(n) for n in b.nfes)
    convergence_steps = tuple(int(n) for n in b.convergence.steps)
    rows, convergence = [], []
    for name in b.problems:
        start = time.time()
        problem = build_problem(name, int(b.num_samples[name]), int(b.seed), float(b.sigma_min),
                                float(b.sigma_max), float(b.rho), float(b.reference_tol),
                                b.get('problem_options', {}).get(name))
        rows.append(score(problem, 'reference', 0, problem.reference))
        for label, nfe, samples in fixed_grid_rows(problem, nfes, tuple(b.solvers)):
            rows.append(score(problem, label, nfe, samples))
        if b.amed_rows:
            from jaxdiff.bench import amed
            for label, nfe, samples in amed.truth_rows(problem, nfes, **dict(b.amed)):
                rows.append(score(problem, label, nfe, samples))
        convergence += convergence_rows(problem, tuple(b.convergence.solvers), convergence_steps)
        print(f'[{name}: {len(problem.x_T)} samples of shape {problem.x_T.shape[1:]}, {time.time() - start:.0f}s]')
        for metric in ('rmse', 'fd'):
            print_table(rows, name, metric, nfes)
        print_convergence(convergence, name, convergence_steps)
    csv_path = os.path.join(workdir, 'bench_solvers.csv')
    _write_csv(csv_path, rows)
    if convergence:
        _write_csv(os.path.join(workdir, 'bench_solvers_convergence.csv'), convergence)
    png_path = os.path.join(workdir, 'bench_solvers.png')
    plot(rows, list(b.problems), png_path, nfes)
    print(f'\nwrote {csv_path}, {png_path} and bench_solvers_convergence.csv')
    return rows, convergence
