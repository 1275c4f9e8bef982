"""Truth benchmark of the fixed-grid solvers (mode `bench_solvers`; configs/bench_solvers.py holds the command).

For each problem with an exact denoiser (a 2-D Gaussian mixture, a 16x16 Gaussian mixture with well-separated modes,
the empirical distribution of scikit-learn's digits), every solver runs from the same x_T on EDM grids whose step
count gives exactly the requested NFE (checked against the solver's reported `info['nfe']`; combinations that no
step count reaches are skipped) and is scored by
  - rmse: endpoint RMSE against a float64 adaptive reference solve of the same ODE from the same x_T
          (`analytic.reference_solve`), i.e. the discretisation error of the flow map;
  - fd:   Frechet distance (float64) between the samples and exact samples of the data distribution.
A row 'reference' gives the reference solve's own FD: the floor set by the finite sample size.

Output: a printed table per problem and metric, WORKDIR/bench_solvers.csv and WORKDIR/bench_solvers.png.

Extension hook: append to `ROW_PRODUCERS` a function `producer(problem, nfes) -> iterable of (solver_label, nfe,
samples)`; its rows are scored and printed with the others (AMED rows plug in here).
"""
import csv
import dataclasses
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import analytic, metrics, samplers, schedules
from jaxdiff.errors import UserError

# label -> (sampler name, options, calls per step into sigma > 0, calls of the step into 0, saved calls)
SOLVERS = {
    'euler': ('euler', {}, 1, 1, 0),
    'heun': ('heun', {}, 2, 1, 0),
    'heun+afs': ('heun', {'afs': True}, 2, 1, 1),
    'dpm2': ('dpm2', {}, 2, 1, 0),
    'dpm2+afs': ('dpm2', {'afs': True}, 2, 1, 1),
    'dpmpp_2m': ('dpmpp_2m', {}, 1, 1, 0),
    'dpmpp_3m': ('dpmpp_3m', {}, 1, 1, 0),
    'ipndm': ('ipndm', {}, 1, 1, 0),
    'ipndm+afs': ('ipndm', {'afs': True}, 1, 1, 1),
}

ROW_PRODUCERS: list = []


@dataclasses.dataclass
class Problem:
    name: str
    denoiser: Callable              # float32 exact denoiser the solvers use
    x_T: jax.Array                  # [n, ...] float32 start samples, sigma_max * N(0, I)
    reference: np.ndarray           # float64 reference-solve endpoints from the same x_T
    exact_samples: np.ndarray       # samples of the data distribution (for the Frechet distance)
    sigma_min: float
    sigma_max: float
    rho: float


def steps_for(label, nfe):
    """Number of EDM steps (grid ending at 0) at which solver `label` spends exactly `nfe` calls, or None.
    NFE(N) = (N - 1) * per_step + last_step - saved."""
    _, _, per_step, last_step, saved = SOLVERS[label]
    rest = nfe + saved - last_step
    if rest < 0 or rest % per_step:
        return None
    steps = rest // per_step + 1
    return steps if steps >= 2 or saved == 0 else None


def _mixture_2d(dtype):
    angles = np.arange(8) * 2 * np.pi / 8
    means = 2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return analytic.GaussianMixture(jnp.asarray(means, dtype), jnp.full((8,), 0.15, dtype),
                                    jnp.asarray(np.linspace(1.0, 2.0, 8), dtype))


def _gmm_16x16(dtype, num_components=8):
    # modes: random +-0.5 sign images (pairwise distances ~ 16), component std 0.1 -> well separated
    signs = np.random.default_rng(1).choice([-0.5, 0.5], size=(num_components, 16, 16, 1))
    return analytic.GaussianMixture(jnp.asarray(signs, dtype), jnp.full((num_components,), 0.1, dtype),
                                    jnp.full((num_components,), 1.0, dtype))


def _digits(dtype):
    from sklearn.datasets import load_digits
    images = load_digits().images.astype(np.float64) / 8.0 - 1.0                    # [1797, 8, 8] in [-1, 1]
    return analytic.Empirical(jnp.asarray(images[..., None], dtype), chunk_size=1024)


MAKERS = {'mixture_2d': _mixture_2d, 'gmm_16x16': _gmm_16x16, 'digits': _digits}


def build_problem(name, num_samples, seed, sigma_min, sigma_max, rho, reference_tol):
    if name not in MAKERS:
        raise UserError(f'bench.problems: unknown problem {name!r}; valid: {", ".join(MAKERS)}')
    target32 = MAKERS[name](jnp.float32)
    key_x, key_exact = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), len(name)))
    x_T = jax.random.normal(key_x, (num_samples,) + target32.event_shape, jnp.float32) * sigma_max
    with jax.enable_x64(True):
        target64 = MAKERS[name](jnp.float64)
        reference = analytic.reference_solve(target64.denoiser, jnp.asarray(x_T, jnp.float64), sigma_max, 0.0,
                                             rtol=reference_tol, atol=reference_tol)
        reference = np.asarray(reference, np.float64)
    if isinstance(target32, analytic.Empirical):
        exact = np.asarray(target32.data)                                               # the whole dataset
    else:
        exact = np.asarray(target32.sample(key_exact, num_samples))
    return Problem(name, target32.denoiser, x_T, reference, exact, sigma_min, sigma_max, rho)


def fixed_grid_rows(problem, nfes, labels):
    """(label, nfe, samples) for every solver and reachable NFE; checks reported NFE == requested."""
    for label in labels:
        name, options, *_ = SOLVERS[label]
        sampler = samplers.get(name, **options)
        run = jax.jit(lambda x, s, sampler=sampler: sampler(problem.denoiser, x, s))
        for nfe in nfes:
            steps = steps_for(label, nfe)
            if steps is None:
                continue
            sigmas = schedules.get('edm', num_steps=steps, sigma_min=problem.sigma_min,
                                   sigma_max=problem.sigma_max, rho=problem.rho)
            samples, info = run(problem.x_T, sigmas)
            if int(info['nfe']) != nfe:
                raise AssertionError(f'{label}: {steps} steps report NFE {int(info["nfe"])}, expected {nfe}')
            yield label, nfe, samples


def score(problem, label, nfe, samples):
    samples = np.asarray(samples, np.float64)
    if not np.all(np.isfinite(samples)):                          # a diverged solver: reported, not fatal
        return {'problem': problem.name, 'solver': label, 'nfe': nfe, 'rmse': np.nan, 'fd': np.nan}
    rmse = float(np.sqrt(np.mean((samples - problem.reference) ** 2)))
    return {'problem': problem.name, 'solver': label, 'nfe': nfe, 'rmse': rmse,
            'fd': metrics.frechet_distance(samples, problem.exact_samples)}


def print_table(rows, problem_name, metric, nfes):
    labels = list(dict.fromkeys(r['solver'] for r in rows if r['problem'] == problem_name))
    cell = {(r['solver'], r['nfe']): r[metric] for r in rows if r['problem'] == problem_name}
    print(f'\n{problem_name}: {metric} (rows: solver, columns: NFE)')
    print(f'{"solver":<12}' + ''.join(f'{n:>10}' for n in nfes))
    for label in labels:
        if label == 'reference':
            print(f'{"reference":<12}{cell[("reference", 0)]:>10.3g}   (float64 adaptive solve: the sample-size floor)')
            continue
        print(f'{label:<12}' + ''.join(f'{cell[(label, n)]:>10.3g}' if (label, n) in cell else f'{"-":>10}'
                                       for n in nfes))


def plot(rows, problems, path, nfes):
    import matplotlib
    import matplotlib.ticker
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, len(problems), figsize=(5 * len(problems), 8), squeeze=False)
    for col, problem in enumerate(problems):
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


def run(config, workdir):
    if not workdir:
        raise UserError('--workdir is required for mode bench_solvers (CSV and PNG are written there)')
    b = config.bench
    unknown = [label for label in b.solvers if label not in SOLVERS]
    if unknown:
        raise UserError(f'bench.solvers: unknown {", ".join(unknown)}; valid: {", ".join(SOLVERS)}')
    os.makedirs(workdir, exist_ok=True)
    nfes = tuple(int(n) for n in b.nfes)
    rows = []
    for name in b.problems:
        start = time.time()
        problem = build_problem(name, int(b.num_samples[name]), int(b.seed), float(b.sigma_min),
                                float(b.sigma_max), float(b.rho), float(b.reference_tol))
        reference_row = score(problem, 'reference', 0, problem.reference)
        rows.append(reference_row)
        producers = [lambda p, n: fixed_grid_rows(p, n, tuple(b.solvers))] + list(ROW_PRODUCERS)
        for producer in producers:
            for label, nfe, samples in producer(problem, nfes):
                rows.append(score(problem, label, nfe, samples))
        print(f'[{name}: {len(problem.x_T)} samples of shape {problem.x_T.shape[1:]}, {time.time() - start:.0f}s]')
        for metric in ('rmse', 'fd'):
            print_table(rows, name, metric, nfes)
    csv_path = os.path.join(workdir, 'bench_solvers.csv')
    with open(csv_path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=['problem', 'solver', 'nfe', 'rmse', 'fd'])
        writer.writeheader()
        writer.writerows(rows)
    png_path = os.path.join(workdir, 'bench_solvers.png')
    plot(rows, list(b.problems), png_path, nfes)
    print(f'\nwrote {csv_path} and {png_path}')
    return rows
