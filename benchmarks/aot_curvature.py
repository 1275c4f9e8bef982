"""The AOT paper's claim at small scale (Kim et al. 2024, arXiv:2403.05069): does pairing noise with images by
optimal transport during training straighten the sampling ODE's trajectories and lower the error at few steps?

    .venv/bin/python benchmarks/aot_curvature.py        # toy2d + digits, 2 seeds (13 min on 2 cores at load 16)
    .venv/bin/python benchmarks/aot_curvature.py --problems=toy2d --seeds=0 --toy2d_steps=600 --toy2d_samples=10000 --toy2d_sw_projections=512

(the second: converged toy2d quality with a sample-noise floor low enough to separate the pairings).

For each problem, pairing (independent: EDM; exact: AOT's optimal assignment; sinkhorn: AOT with ott-jax's
Sinkhorn, rounded to a permutation) and seed, one model is trained by the training loop (`jaxdiff.modes.train`)
with the same steps, data order (the pools are the minibatches of their steps), seed and initialisation; only the
pairing differs. AOT settings: the Euclidean cost on unit noise, pools of P images reused for P/B steps.
  toy2d   configs/toy2d_aot.py: eight Gaussians (exact samples known: the source's mixture), MLP; batch 256,
          pool 512 (2 steps per pool, the authors' unconditional ratio).
  digits  configs/digits_aot.py, unconditional, at 8x8 with an MLP (64 dimensions, no augmentation); batch 128,
          pool 256 (2 steps per pool); 1500 training digits, 297 held out.
Each model's EMA denoiser then samples from the same starting noise x_T (per problem and seed) with EDM's grid
(rho 7, sigma 0.002..80):
  curvature   `metrics.curvature` of the trajectory of a fine Heun solve (--reference_steps steps), whose endpoint
              x_ref also serves as the exact solution of the model's ODE
  solver err  RMS distance of the NFE-n sample to x_ref (truncation error of the solver on this model's ODE)
  quality     toy2d: sliced Wasserstein distance and Frechet distance to exact samples of the mixture;
              digits: Frechet distance in the digits classifier's features (jaxdiff.drivers.digits_metric) and pixel sliced
              Wasserstein, both to the 297 held-out digits
for Euler and Heun at NFE 3..35. Tables: mean over seeds (and its spread for curvature). --json writes the rows.
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
from jaxdiff.drivers import config_files, fid, sampling, trained as trained_lib, train_step
from jaxdiff import data
from jaxdiff.core import metrics, samplers, schedules  # noqa: E402
from jaxdiff.modes import train  # noqa: E402
from jaxdiff.drivers.progress import Progress  # noqa: E402

PAIRINGS = {'independent': dict(pairing='independent'),
            'exact': dict(pairing='aot', coupling_method='exact'),
            'sinkhorn': dict(pairing='aot', coupling_method='sinkhorn')}
NFES = (3, 5, 7, 9, 11, 15, 21, 35)
SAMPLERS = ('euler', 'heun')


# ---------------------------------------------------------------- the problems

def training_fields(steps, batch_size):
    return {'training.batch_size': batch_size, 'training.total_images': steps * batch_size,
            'training.lr_rampup_images': 20 * batch_size, 'training.ema_halflife_images': steps * batch_size // 20,
            'training.log_every_steps': max(steps // 4, 1), 'training.checkpoint_every_steps': steps,
            'training.keep_checkpoints': 1, 'training.sample_every_steps': 0}


class Toy2d:
    name = 'toy2d'
    batch_size = 256

    def __init__(self, args):
        self.steps, self.pool_size = args.toy2d_steps, args.toy2d_pool
        self.source = data.build(dict(name='eight_gaussians', shape=(2,)))
        self.num_samples, self.num_projections = args.toy2d_samples, args.toy2d_sw_projections
        key = jax.random.key(12345)
        self.truth = np.asarray(self.source.mixture.sample(key, self.num_samples))
        self.truth_b = np.asarray(self.source.mixture.sample(jax.random.fold_in(key, 1), self.num_samples))

    def config(self, pairing, seed):
        config = config_files.named('toy2d_aot', **training_fields(self.steps, self.batch_size),
                                    **{'training.seed': seed, 'training.lr': 2e-3, 'loss.pool_size': self.pool_size})
        config.loss.update(PAIRINGS[pairing])
        return config

    def quality(self, samples):
        key = jax.random.key(7)
        return {'SW': float(metrics.sliced_wasserstein(samples, self.truth, key,
                                                       num_projections=self.num_projections)),
                'FD': metrics.frechet_distance(samples, self.truth)}

    def floor(self):
        """The metrics of a second exact sample set of the same size: what a perfect model would score."""
        return self.quality(self.truth_b)


class Digits:
    name = 'digits'
    batch_size = 128
    shape = (8, 8, 1)

    def __init__(self, args):
        from jaxdiff.drivers import digits_metric
        self.steps, self.pool_size = args.digits_steps, args.digits_pool
        self.num_samples = args.digits_samples
        self.metric = digits_metric.DigitsMetric(resolution=8, verbose=True)
        self.held_out = data.build(dict(name='digits', shape=self.shape, split='test')).images
        self.held_out_stats = fid.RunningStatistics().update(self.metric.features(self.held_out))
        self.train_images = data.build(dict(name='digits', shape=self.shape, split='train')).images

    def config(self, pairing, seed):
        config = config_files.named('digits_aot', **training_fields(self.steps, self.batch_size),
                                    **{'training.seed': seed, 'training.lr': 2e-3, 'loss.pool_size': self.pool_size,
                                       'loss.per_class': False, 'data.shape': self.shape})
        config.model = dict(name='mlp', hidden_dim=256, num_layers=3, embedding_dim=64, dropout=0.0)
        config.loss.update(PAIRINGS[pairing])
        return config

    def quality(self, samples):
        features = self.metric.features(np.clip(samples, -1, 1))
        return {'digits FD': fid.frechet_distance(fid.RunningStatistics().update(features), self.held_out_stats),
                'SW': float(metrics.sliced_wasserstein(samples, self.held_out, jax.random.key(7)))}

    def floor(self):
        """The training digits scored like samples (as many as the samples): the floor of a memorising model."""
        rng = np.random.default_rng(0)
        return self.quality(self.train_images[rng.choice(len(self.train_images), self.num_samples)])


PROBLEMS = {'toy2d': Toy2d, 'digits': Digits}


# ---------------------------------------------------------------- sampling

class Solvers:
    """Jitted solves shared by every model of a problem (one compile per sampler and grid)."""

    def __init__(self, config, reference_steps):
        model, _, precond = trained_lib.networks_of(config)
        self.denoiser_fn = trained_lib.denoiser_fn_for(model, precond)
        self._compiled = {}
        self.reference_sigmas = self.grid(reference_steps)

    @staticmethod
    def grid(num_steps):
        return schedules.get('edm', num_steps=num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0)

    def solve(self, name, sigmas, variables, x_T, trajectory=False):
        key = (name, len(sigmas), trajectory)
        if key not in self._compiled:
            sampler = samplers.get(name)

            def run(variables, x_T, sigmas):
                x0, info = sampler(self.denoiser_fn(variables), x_T, sigmas, return_trajectory=trajectory)
                return (x0, info['trajectory']) if trajectory else x0
            self._compiled[key] = jax.jit(run)
        return jax.device_get(self._compiled[key](variables, x_T, sigmas))


def evaluate(problem, solvers, variables, x_T, nfes):
    """Rows {sampler, nfe, error, <quality metrics>} and the curvature of the fine reference solve."""
    x_ref, trajectory = solvers.solve('heun', solvers.reference_sigmas, variables, x_T, trajectory=True)
    curvature = float(metrics.curvature(trajectory, solvers.reference_sigmas))
    rows = []
    for name in SAMPLERS:
        sampler = samplers.get(name)
        for nfe in nfes:
            num_points = sampler.num_points_for(nfe)
            if num_points is None:
                continue
            samples = solvers.solve(name, solvers.grid(num_points - 1), variables, x_T)
            rows.append(dict(sampler=name, nfe=nfe, error=float(metrics.endpoint_rmse(samples, x_ref)),
                             **problem.quality(samples)))
    reference_nfe = samplers.get('heun').nfe(len(solvers.reference_sigmas))
    return curvature, dict(problem.quality(x_ref), nfe=reference_nfe), rows


# ---------------------------------------------------------------- tables

def mean_std(values):
    return float(np.mean(values)), float(np.std(values))


def fmt(value):
    return f'{value:.3g}' if abs(value) < 1000 else f'{value:.0f}'


def print_tables(problem_name, results, floor, nfes, out):
    pairings = list(results)
    seeds = len(next(iter(results.values())))
    lines = [f'\n### {problem_name}: curvature and quality at the fine reference solve (mean over {seeds} seeds)\n']
    quality_names = [k for k in results[pairings[0]][0]['reference'] if k != 'nfe']
    ref_nfe = results[pairings[0]][0]['reference']['nfe']
    lines.append('| pairing | curvature | ' + ' | '.join(f'{q} ({ref_nfe} NFE)' for q in quality_names)
                 + ' | train s |')
    lines.append('|' + '---|' * (3 + len(quality_names)))
    for p in pairings:
        c_mean, c_std = mean_std([r['curvature'] for r in results[p]])
        q = [fmt(np.mean([r['reference'][name] for r in results[p]])) for name in quality_names]
        seconds = np.mean([r['train_seconds'] for r in results[p]])
        lines.append(f'| {p} | {c_mean:.4g} ± {c_std:.2g} | ' + ' | '.join(q) + f' | {seconds:.0f} |')
    lines.append('| (floor: ' + ('exact samples' if problem_name == 'toy2d' else 'training digits') + ') | | '
                 + ' | '.join(fmt(floor[name]) for name in quality_names) + ' | |')
    for metric in ['error'] + quality_names:
        title = ('solver error: RMS distance to the fine solve' if metric == 'error' else metric)
        lines.append(f'\n{problem_name}, {title}, vs NFE (mean over seeds)\n')
        lines.append('| sampler | pairing | ' + ' | '.join(str(n) for n in nfes) + ' |')
        lines.append('|' + '---|' * (2 + len(nfes)))
        for sampler in SAMPLERS:
            for p in pairings:
                cells = []
                for nfe in nfes:
                    values = [row[metric] for r in results[p] for row in r['rows']
                              if row['sampler'] == sampler and row['nfe'] == nfe]
                    cells.append(fmt(np.mean(values)) if values else '')
                lines.append(f'| {sampler} | {p} | ' + ' | '.join(cells) + ' |')
    text = '\n'.join(lines)
    print(text, flush=True)
    out.append(text)


def ratios(results, nfes, metric, sampler, low=(3, 5, 7)):
    """mean over the low NFEs of metric(pairing) / metric(independent), per pairing."""
    def mean_at(p, nfe):
        return np.mean([row[metric] for r in results[p] for row in r['rows']
                        if row['sampler'] == sampler and row['nfe'] == nfe])
    chosen = [n for n in low if n in nfes and not np.isnan(mean_at('independent', n))]
    return {p: float(np.mean([mean_at(p, n) / mean_at('independent', n) for n in chosen]))
            for p in results if p != 'independent'}, chosen


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--problems', default='toy2d,digits')
    parser.add_argument('--pairings', default=','.join(PAIRINGS))
    parser.add_argument('--seeds', default='0,1')
    parser.add_argument('--toy2d_steps', type=int, default=400)
    parser.add_argument('--digits_steps', type=int, default=600)
    parser.add_argument('--toy2d_pool', type=int, default=512, help='AOT pool (batch 256)')
    parser.add_argument('--digits_pool', type=int, default=256, help='AOT pool (batch 128)')
    parser.add_argument('--toy2d_samples', type=int, default=3000)
    parser.add_argument('--toy2d_sw_projections', type=int, default=64)
    parser.add_argument('--digits_samples', type=int, default=1000)
    parser.add_argument('--reference_steps', type=int, default=64, help='Heun steps of the fine solve')
    parser.add_argument('--nfes', default=','.join(map(str, NFES)))
    parser.add_argument('--json', default='', help='write all rows to this file')
    args = parser.parse_args()
    nfes = tuple(int(n) for n in args.nfes.split(','))
    seeds = [int(s) for s in args.seeds.split(',')]
    pairings = args.pairings.split(',')
    print(f'AOT curvature benchmark on {cpu_name()} ({os.cpu_count()} cores visible, jax {jax.__version__}, '
          f'{jax.devices()[0].platform}); seeds {seeds}', flush=True)
    start = time.perf_counter()
    out, everything = [], {}
    for problem_name in args.problems.split(','):
        problem = PROBLEMS[problem_name](args)
        results = {p: [] for p in pairings}
        solvers = None
        progress = Progress(f'{problem_name} models', total=len(pairings) * len(seeds), unit='model', interval=0)
        for seed in seeds:
            x_T = None
            for pairing in pairings:
                config = problem.config(pairing, seed)
                if solvers is None:
                    solvers = Solvers(config, args.reference_steps)
                with tempfile.TemporaryDirectory() as workdir:
                    t0 = time.perf_counter()
                    state = train.run(config, workdir, devices=jax.devices()[:1])
                    seconds = time.perf_counter() - t0
                variables = train_step.ema_item(state)
                if x_T is None:   # the same starting noise for every pairing of this seed
                    shape = (problem.num_samples, *config.data.shape)
                    x_T = 80.0 * jax.random.normal(jax.random.fold_in(jax.random.key(999), seed), shape)
                t0 = time.perf_counter()
                curvature, reference, rows = evaluate(problem, solvers, variables, x_T, nfes)
                results[pairing].append(dict(seed=seed, curvature=curvature, reference=reference, rows=rows,
                                             train_seconds=seconds, eval_seconds=time.perf_counter() - t0))
                print(f'{problem_name} {pairing} seed {seed}: trained in {seconds:.0f} s, evaluated in '
                      f'{time.perf_counter() - t0:.0f} s', flush=True)
                progress.update()
        progress.close()
        print_tables(problem_name, results, problem.floor(), nfes, out)
        for sampler in SAMPLERS:
            for metric in ['error'] + [k for k in results[pairings[0]][0]['reference'] if k != 'nfe']:
                if 'independent' in results and len(pairings) > 1:
                    r, chosen = ratios(results, nfes, metric, sampler)
                    line = (f'{problem_name} {sampler} {metric} at NFE {chosen}, relative to independent: '
                            + ', '.join(f'{p} x{v:.3f}' for p, v in r.items()))
                    print(line)
                    out.append(line)
        if 'independent' in results:
            c0 = np.mean([r['curvature'] for r in results['independent']])
            line = f'{problem_name} curvature relative to independent: ' + ', '.join(
                f'{p} x{np.mean([r["curvature"] for r in results[p]]) / c0:.3f}' for p in pairings
                if p != 'independent')
            print(line)
            out.append(line)
        everything[problem_name] = dict(results=results, floor=problem.floor())
    print(f'\ntotal {time.perf_counter() - start:.0f} s on {cpu_name()}', flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(everything, f, indent=1)


if __name__ == '__main__':
    main()
