"""The Fast-ODE paper's claim at small scale (Lee, Kim, Ye, "Minimizing Trajectory Curvature of ODE-based Generative
Models", ICML 2023): does learning the coupling q(z | x) with a KL weight beta straighten the flow's trajectories and
lower the error at few NFE, compared with the independent rectified flow?

    .venv/bin/python benchmarks/fastode_curvature.py             # two toys, 1 seed, 2000 steps (CPU, ~10 min)
    .venv/bin/python benchmarks/fastode_curvature.py --seeds=0,1 --steps=10000 --json=benchmarks/results/fastode_curvature.json

Models (trained by the training loop, `jaxdiff.modes.train`, with the same steps, seed, initialisation of the flow
network and data; only the pairing and beta differ): the independent baseline (loss.pairing='independent') and
Fast-ODE at beta in {1, 10, 20, 50}, on
  two_gaussians  configs/toy2d_fastode.py, the authors' toy: N((-8, 8), diag(3, 0.1)) + N((8, 8), diag(3, 0.1)),
                 tanh MLPs of 100 units, Adam lr 1e-3, batch 512 (the authors train 100k steps; --steps here)
  eight_gaussians configs/toy2d_fastode_eight_gaussians.py (radius 2, mode std 0.1), the same recipe.
Generation never uses the encoder: every model samples from the same z ~ N(0, I) (x_T = sigma_max z).
  straightness  the authors' measure (`metrics.straightness`) on the flow's own trajectory x_t, solved in t with RK4
                (--reference_steps steps, uniform t from 0.999 to 0) with the raw velocity network
  curvature     `metrics.curvature` of a 64-step Heun solve on EDM's grid (rho 7, 0.002..80), the AOT benchmark's
  error         RMS distance of a sampler's output to that RK4 solution from the same x_T (the model's own ODE)
  SW, FD        sliced Wasserstein and Frechet distance to exact samples of the data (floor: a second exact set)
Samplers and grids (NFE 1, 2, 3, 4, 5, 8 where the sampler has such a grid): Euler on the authors' uniform-t grid
('flow_uniform', t from 0.999; their sampler), and on EDM's grid Euler, Heun, DPM-Solver++(2M), iPNDM; AMED-Solver
(NFE 3, 5; the AMED bench's recipe: time-uniform grid, AFS, Heun teacher) trained on each flow model
(`jaxdiff.bench.amed.train_and_sample` -> `amed_train.train_predictor`). A tanh MLP sows no bottleneck, so AMED's
predictor reads zeros and learns a per-step schedule (r_n, c_n), not a per-sample one.
Prints the tables, the ratios to the baseline, writes a plot (--plot) and optionally --json.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxdiff.bench.speed import cpu_name  # noqa: E402
from jaxdiff.drivers import config_files, sampling, trained as trained_lib, train_step
from jaxdiff import data
from jaxdiff.core import metrics, samplers, schedules  # noqa: E402
from jaxdiff.bench import amed as amed_bench  # noqa: E402
from jaxdiff.models.amed_predictor import AMEDPredictor  # noqa: E402
from jaxdiff.modes import train  # noqa: E402
from jaxdiff.drivers.progress import Progress  # noqa: E402

VARIANTS = {'independent': dict(pairing='independent'), 'beta=1': dict(pairing='fastode', beta=1.0),
            'beta=10': dict(pairing='fastode', beta=10.0), 'beta=20': dict(pairing='fastode', beta=20.0),
            'beta=50': dict(pairing='fastode', beta=50.0)}
PROBLEMS = {'two_gaussians': 'toy2d_fastode', 'eight_gaussians': 'toy2d_fastode_eight_gaussians'}
# (label, sampler, grid): grid 'uniform_t' = schedules 'flow_uniform' from sigma 999 (t = 0.999) to 0; 'edm' = EDM's
# rho-7 grid 0.002..80 with the final 0; 'amed' = AMED-Solver's own grid (no final 0)
SAMPLERS = (('euler (uniform t)', 'euler', 'uniform_t'), ('euler (edm)', 'euler', 'edm'), ('heun', 'heun', 'edm'),
            ('dpmpp_2m', 'dpmpp_2m', 'edm'), ('ipndm', 'ipndm', 'edm'), ('amed', 'amed', 'amed'))
NFES = (1, 2, 3, 4, 5, 8)
AMED_NFES = (3, 5)
SIGMA_MAX = {'uniform_t': 999.0, 'edm': 80.0, 'amed': 80.0}


def grid(kind, num_points):
    if kind == 'uniform_t':
        return schedules.get('flow_uniform', num_steps=num_points - 1, sigma_max=SIGMA_MAX[kind])
    return schedules.get('edm', num_steps=num_points - 1, sigma_min=0.002, sigma_max=80.0, rho=7.0)


def make_config(problem, variant, seed, steps, batch_size=512):
    config = config_files.named(PROBLEMS[problem], **{
        'training.batch_size': batch_size, 'training.total_images': steps * batch_size, 'training.seed': seed,
        'training.log_every_steps': max(steps // 4, 1), 'training.checkpoint_every_steps': steps,
        'training.keep_checkpoints': 1, 'training.sample_every_steps': 0})
    config.loss.update(VARIANTS[variant])
    return config


class Solvers:
    """Jitted solves shared by every model (the flow net's structure is the same for all): one compile per sampler and
    grid length, parameters and grids as arguments."""

    def __init__(self, config):
        self.model, _, precond = trained_lib.networks_of(config)
        self.denoiser_fn = trained_lib.denoiser_fn_for(self.model, precond)
        self._compiled = {}

        @jax.jit
        def rk4_in_t(params, x_t, t_grid):
            """The flow's ODE dx_t/dt = v(x_t, t) with classic RK4 on the grid t_grid [N + 1]; [N + 1, B, ...]."""
            def v(x, t):
                return self.model.apply({'params': params}, x, jnp.full((x.shape[0],), t, x.dtype))

            def step(x, ts):
                t, t_next = ts
                h = t_next - t
                k1 = v(x, t)
                k2 = v(x + h / 2 * k1, t + h / 2)
                k3 = v(x + h / 2 * k2, t + h / 2)
                k4 = v(x + h * k3, t_next)
                x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
                return x, x
            _, points = jax.lax.scan(step, x_t, (t_grid[:-1], t_grid[1:]))
            return jnp.concatenate([x_t[None], points])
        self.rk4_in_t = rk4_in_t

    def denoiser(self, variables):
        """The SPEC denoiser without `with_aux` (AMED then feeds its predictor zeros; see the module docstring)."""
        D = self.denoiser_fn(variables)
        return lambda x, sigma: D(x, sigma)

    def solve(self, name, sigmas, variables, x_T, trajectory=False):
        key = (name, len(sigmas), trajectory)
        if key not in self._compiled:
            sampler = samplers.get(name)

            def run(variables, x_T, sigmas):
                x0, info = sampler(self.denoiser(variables), x_T, sigmas, return_trajectory=trajectory)
                return (x0, info['trajectory']) if trajectory else x0
            self._compiled[key] = jax.jit(run)
        return jax.device_get(self._compiled[key](variables, x_T, sigmas))


def quality(samples, truth, num_projections):
    return {'SW': float(metrics.sliced_wasserstein(samples, truth, jax.random.key(7), num_projections)),
            'FD': float(metrics.frechet_distance(np.asarray(samples, np.float64), np.asarray(truth, np.float64)))}


def evaluate(solvers, variables, z, truth, args):
    """Straightness, curvature, reference quality and the rows {sampler, nfe, error, SW, FD} of one model."""
    params = variables['params']['model']
    references = {}
    for kind in ('uniform_t', 'edm'):
        sigma_max = SIGMA_MAX[kind]
        t_grid = jnp.linspace(sigma_max / (1 + sigma_max), 0.0, args.reference_steps + 1)
        trajectory = np.asarray(solvers.rk4_in_t(params, z * (sigma_max / (1 + sigma_max)), t_grid))
        references[kind] = trajectory[-1]
        if kind == 'uniform_t':
            straightness = float(metrics.straightness(trajectory))
    references['amed'] = references['edm']
    heun_sigmas = grid('edm', 65)
    _, heun_trajectory = solvers.solve('heun', heun_sigmas, variables, 80.0 * z, trajectory=True)
    curvature = float(metrics.curvature(heun_trajectory, heun_sigmas))
    rows = []
    for label, name, kind in SAMPLERS:
        x_T = SIGMA_MAX[kind] * z
        for nfe in (args.amed_nfes if name == 'amed' else NFES):
            if name == 'amed':
                samples, *_ = amed_bench.train_and_sample(
                    'AMED-Solver', nfe, solvers.denoiser, variables, AMEDPredictor(), x_T, sigma_min=0.002,
                    sigma_max=80.0, num_trajectories=args.amed_trajectories, batch_size=128, seed=0)
                samples = np.asarray(samples)
            else:
                try:
                    num_points = samplers.get(name).num_points_for(nfe)
                except ValueError:
                    continue                       # e.g. Heun has no grid with 2 or 4 calls
                samples = solvers.solve(name, grid(kind, num_points), variables, x_T)
            error = float(np.sqrt(np.mean((samples - references[kind]) ** 2)))
            rows.append(dict(sampler=label, nfe=nfe, error=error, **quality(samples, truth, args.sw_projections)))
    return dict(straightness=straightness, curvature=curvature,
                reference=quality(references['uniform_t'], truth, args.sw_projections)), rows


def last_logged(workdir, name):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return lines[-1].get(name, 0.0)


# ---------------------------------------------------------------- tables

def fmt(value):
    return '' if value is None or np.isnan(value) else (f'{value:.3g}' if abs(value) < 1000 else f'{value:.0f}')


def mean_of(results, variant, key):
    return float(np.mean([r[key] for r in results[variant]]))


def row_mean(results, variant, sampler, nfe, metric):
    values = [row[metric] for r in results[variant] for row in r['rows'] if row['sampler'] == sampler
              and row['nfe'] == nfe]
    return float(np.mean(values)) if values else float('nan')


def tables(problem, results, floor, seeds):
    variants = list(results)
    lines = [f'\n### {problem}: the models (mean over {seeds} seed{"s" if seeds > 1 else ""})\n',
             '| variant | straightness | curvature | KL/dim (train) | SW (RK4) | FD (RK4) | train s | eval s |',
             '|---|---|---|---|---|---|---|---|']
    for v in variants:
        lines.append(f'| {v} | {mean_of(results, v, "straightness"):.4g} | {mean_of(results, v, "curvature"):.4g} | '
                     f'{mean_of(results, v, "kl"):.3g} | '
                     f'{np.mean([r["reference"]["SW"] for r in results[v]]):.3g} | '
                     f'{np.mean([r["reference"]["FD"] for r in results[v]]):.3g} | '
                     f'{mean_of(results, v, "train_seconds"):.0f} | {mean_of(results, v, "eval_seconds"):.0f} |')
    lines.append(f'| (floor: exact samples) | | | | {floor["SW"]:.3g} | {floor["FD"]:.3g} | | |')
    for metric, title in (('error', 'solver error (RMS distance to the RK4 solution of the same model)'),
                          ('SW', 'sliced Wasserstein to exact samples'), ('FD', 'Frechet distance to exact samples')):
        lines.append(f'\n{problem}, {title}, vs NFE\n')
        lines.append('| sampler | variant | ' + ' | '.join(str(n) for n in NFES) + ' |')
        lines.append('|' + '---|' * (2 + len(NFES)))
        for label, _, _ in SAMPLERS:
            for v in variants:
                lines.append(f'| {label} | {v} | '
                             + ' | '.join(fmt(row_mean(results, v, label, n, metric)) for n in NFES) + ' |')
    return '\n'.join(lines)


def ratios(problem, results, amed_nfes, low=(1, 2, 3, 4)):
    """Per variant: straightness and curvature relative to the baseline, and the few-NFE error ratio (mean over the
    NFEs of `low` a sampler has) per sampler."""
    if 'independent' not in results:
        return ''
    lines = []
    for v in (v for v in results if v != 'independent'):
        relative = lambda key: mean_of(results, v, key) / mean_of(results, 'independent', key)
        parts = [f'straightness x{relative("straightness"):.3f}', f'curvature x{relative("curvature"):.3f}']
        for label, name, _ in SAMPLERS:
            nfes = amed_nfes if name == 'amed' else low
            r = [row_mean(results, v, label, n, 'error') / row_mean(results, 'independent', label, n, 'error')
                 for n in nfes]
            r = [x for x in r if np.isfinite(x)]
            if r:
                parts.append(f'{label} error x{np.mean(r):.2f}')
        lines.append(f'{problem} {v} vs independent: ' + ', '.join(parts))
    return '\n'.join(lines)


def plot(all_results, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    problems = list(all_results)
    fig, axes = plt.subplots(len(problems), 3, figsize=(15, 4.2 * len(problems)), squeeze=False)
    for i, problem in enumerate(problems):
        results = all_results[problem]['results']
        variants = list(results)
        colors = dict(zip(variants, plt.cm.viridis(np.linspace(0, 0.9, len(variants)))))
        for j, (label, metric) in enumerate((('euler (uniform t)', 'error'), ('dpmpp_2m', 'error'),
                                             ('euler (uniform t)', 'SW'))):
            ax = axes[i, j]
            for v in variants:
                values = [row_mean(results, v, label, n, metric) for n in NFES]
                ax.plot(NFES, values, 'o-', color=colors[v],
                        label=f'{v} (straightness {mean_of(results, v, "straightness"):.3g})')
            if metric == 'SW':
                ax.axhline(all_results[problem]['floor']['SW'], color='grey', ls=':', label='exact samples')
            ax.set_xscale('log', base=2)
            ax.set_yscale('log')
            ax.set_xlabel('NFE')
            ax.set_ylabel(metric)
            ax.set_title(f'{problem}: {label}, {metric}')
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--problems', default=','.join(PROBLEMS))
    parser.add_argument('--variants', default=','.join(VARIANTS))
    parser.add_argument('--seeds', default='0')
    parser.add_argument('--steps', type=int, default=2000, help='training steps of every model (batch 512)')
    parser.add_argument('--samples', type=int, default=4000)
    parser.add_argument('--reference_steps', type=int, default=64, help='RK4 steps in t of the reference solve')
    parser.add_argument('--sw_projections', type=int, default=64)
    parser.add_argument('--amed_trajectories', type=int, default=640)
    parser.add_argument('--amed_nfes', default=','.join(map(str, AMED_NFES)), help='empty: no AMED rows')
    parser.add_argument('--plot', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                                                        'fastode_curvature.png'))
    parser.add_argument('--json', default='')
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(',')]
    args.amed_nfes = tuple(int(n) for n in args.amed_nfes.split(',') if n)
    variants = args.variants.split(',')
    print(f'Fast-ODE curvature benchmark on {cpu_name()} ({os.cpu_count()} cores visible, jax {jax.__version__}, '
          f'{jax.devices()[0].platform}); seeds {seeds}, {args.steps} steps of batch 512 per model', flush=True)
    start = time.perf_counter()
    everything, text = {}, []
    problems = args.problems.split(',')
    solvers = Solvers(make_config(problems[0], variants[0], 0, 1))     # the same flow net on every problem
    for problem in problems:
        results = {v: [] for v in variants}
        source = data.build(make_config(problem, variants[0], 0, 1).data)
        truth = np.asarray(source.sample(jax.random.key(12345), args.samples)[0])
        floor = quality(np.asarray(source.sample(jax.random.key(54321), args.samples)[0]), truth,
                        args.sw_projections)
        progress = Progress(f'{problem} models', total=len(variants) * len(seeds), unit='model', interval=0)
        for seed in seeds:
            z = jax.random.normal(jax.random.fold_in(jax.random.key(999), seed), (args.samples, 2))
            for variant in variants:
                config = make_config(problem, variant, seed, args.steps)
                with tempfile.TemporaryDirectory() as workdir:
                    t0 = time.perf_counter()
                    state = train.run(config, workdir, devices=jax.devices()[:1])
                    seconds = time.perf_counter() - t0
                    kl = last_logged(workdir, 'loss_prior')
                ema = train_step.ema_item(state)
                variables = {'params': {'model': ema['params']['model']}, 'model_state': ema['model_state']}
                t0 = time.perf_counter()
                summary, rows = evaluate(solvers, variables, z, truth, args)
                results[variant].append(dict(seed=seed, rows=rows, train_seconds=seconds, kl=kl,
                                             eval_seconds=time.perf_counter() - t0, **summary))
                progress.update()
        progress.close()
        everything[problem] = dict(results=results, floor=floor)
        for block in (tables(problem, results, floor, len(seeds)), ratios(problem, results, args.amed_nfes)):
            print(block, flush=True)
            text.append(block)
    if args.plot:
        os.makedirs(os.path.dirname(args.plot), exist_ok=True)
        plot(everything, args.plot)
        print(f'wrote {args.plot}')
    print(f'\ntotal {time.perf_counter() - start:.0f} s on {cpu_name()}', flush=True)
    if args.json:
        meta = dict(command=' '.join(['benchmarks/fastode_curvature.py'] + sys.argv[1:]), cpu=cpu_name(),
                    jax=jax.__version__, steps=args.steps, seeds=seeds, seconds=time.perf_counter() - start)
        with open(args.json, 'w') as f:
            json.dump({'meta': meta, **everything}, f, indent=1)


if __name__ == '__main__':
    main()
