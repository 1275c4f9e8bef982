"""AMED rows for the truth benchmark: AMED-Solver and AMED-Plugin(iPNDM) at NFE 3..10 on exact denoisers.

The truth benchmark (jaxdiff/bench_solvers.py) with the AMED rows added through its ROW_PRODUCERS hook:

    python -m jaxdiff.bench_amed --truth_config=configs/bench_solvers.py --out=runs/bench_solvers_amed

This module's own settings and baselines (a 4x4x3 mixture, the 16x16 digits empirical distribution), and
optionally a trained digits network (Frechet distance to held-out digits, error against a 501-NFE solve):

    python -m jaxdiff.bench_amed --out=runs/bench_amed [--settings=mixture,digits] [--num_trajectories=2560]
    python -m jaxdiff.bench_amed --out=runs/bench_amed --settings= --model_config=configs/digits_amed.py

For every NFE a predictor is trained (amed_train.train_predictor, the paper's recipe: fresh latents, teacher with M
extra points per interval, one Adam step per interval at lr 5e-3) against the analytic denoiser itself, then
sampled from held-out noise. Odd NFE uses AFS (N = (NFE + 1)/2 + 1 grid points), even NFE does not (N = NFE/2 + 1).
An analytic denoiser has no UNet bottleneck, so the predictor's bottleneck input is zeros and it reads only
(t_n, t_{n+1}): here AMED learns a per-step schedule (r_n, c_n), not a per-sample one.

Error: RMSE per dimension, sqrt(mean_b |x_b - x_ref,b|^2 / d), against the reference solve from the same noise
(Heun, 500 NFE on the EDM grid, float64 with the float64 exact denoiser; SPEC.md 'Ground truth'). Baselines on the
same noise: DPM-Solver-2 (AMED with r = 1/2 on the AMED-Solver grid), iPNDM (EDM rho = 7 grid) and DPM-Solver++(3M)
(log-SNR grid), each with NFE = number of steps (the last into sigma = 0).
`amed_rows` is the hook the solver benchmark calls; this module's `main` prints a table on its own settings.
"""
import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import amed_train, analytic, metrics, samplers, schedules
from jaxdiff.models.amed_predictor import AMEDPredictor

NFES = (3, 4, 5, 6, 7, 8, 9, 10)
# the paper's two recipes (Zhou et al. 2024, Sec. 4 / App. C)
METHODS = {
    'AMED-Solver': dict(base=None, schedule='time_uniform', teacher='heun', extra_points=1),
    'AMED-Plugin(iPNDM)': dict(base='ipndm', schedule='edm', teacher='ipndm', extra_points=2),
}


def grid_for(nfe):
    """(num_points, afs) with 2 (N - 1) - [AFS] = nfe: AFS on odd NFE."""
    afs = nfe % 2 == 1
    return amed_train.num_points_for(nfe, afs), afs


def rmse(x, reference):
    return float(metrics.endpoint_rmse(np.asarray(x, np.float64), np.asarray(reference, np.float64)))


def amed_rows(setting, denoiser, x_T, reference, *, nfes=NFES, methods=tuple(METHODS), sigma_min=0.002,
              sigma_max=80.0, num_trajectories=2560, batch_size=128, seed=0, log=print):
    """Rows {setting, method, nfe, error, r, c, train_s} for the AMED methods at each NFE. `denoiser` is exact
    (no bottleneck), x_T [B, ...] held-out start noise (sigma_max z), reference the reference solve from x_T."""
    rows = []
    module = AMEDPredictor()
    for method in methods:
        spec = METHODS[method]
        for nfe in nfes:
            num_points, afs = grid_for(nfe)
            sigmas, teacher_sigmas = amed_train.grids(schedule=spec['schedule'], num_points=num_points,
                                                      sigma_min=sigma_min, sigma_max=sigma_max,
                                                      extra_points=spec['extra_points'])
            start = time.time()
            params, losses = amed_train.train_predictor(
                lambda _: denoiser, (), module, sample_shape=x_T.shape[1:], sigmas=sigmas,
                teacher_sigmas=teacher_sigmas, base=spec['base'], afs=afs, teacher=spec['teacher'],
                extra_points=spec['extra_points'], num_trajectories=num_trajectories, batch_size=batch_size,
                seed=seed)
            seconds = time.time() - start
            sampler = samplers.get('amed', predictor=(module, params), base=spec['base'], afs=afs)
            out, info = sampler(denoiser, x_T, sigmas)
            if info['nfe'] != nfe:
                raise AssertionError(f'{method}: NFE {info["nfe"]} != planned {nfe}')
            r, c, _ = amed_train.learned_steps(module, params, sigmas)
            rows.append(dict(setting=setting, method=method, nfe=nfe, error=rmse(out, reference),
                             r=[round(float(v), 3) for v in r], c=[round(float(v), 4) for v in c],
                             loss_first=float(losses[0]), loss_last=float(losses[-1]), train_s=round(seconds, 1)))
            log(f'{setting:8s} {method:20s} NFE {nfe:2d}  error {rows[-1]["error"]:.4f}  r {rows[-1]["r"]}  '
                f'({seconds:.0f}s)')
    return rows


def baseline_rows(setting, denoiser, x_T, reference, *, nfes=NFES, sigma_min=0.002, sigma_max=80.0):
    """DPM-Solver-2 (r = 1/2 on the AMED-Solver grid and AFS plan), iPNDM (EDM rho 7), DPM-Solver++(3M) (log-SNR)."""
    rows = []
    for nfe in nfes:
        num_points, afs = grid_for(nfe)
        amed_grid, _ = amed_train.grids(schedule='time_uniform', num_points=num_points, sigma_min=sigma_min,
                                        sigma_max=sigma_max)
        runs = (('DPM-Solver-2', samplers.get('amed', afs=afs), amed_grid),
                ('iPNDM', samplers.get('ipndm'), schedules.get('edm', num_steps=nfe, sigma_min=sigma_min,
                                                               sigma_max=sigma_max, rho=7.0)),
                ('DPM-Solver++(3M)', samplers.get('dpmpp_3m'), schedules.get('logsnr', num_steps=nfe,
                                                                             sigma_min=sigma_min,
                                                                             sigma_max=sigma_max)))
        for method, sampler, sigmas in runs:
            out, info = sampler(denoiser, x_T, sigmas)
            if info['nfe'] != nfe:
                raise AssertionError(f'{method}: NFE {info["nfe"]} != {nfe}')
            rows.append(dict(setting=setting, method=method, nfe=nfe, error=rmse(out, reference)))
    return rows


# --- the truth benchmark's hook (bench_solvers.ROW_PRODUCERS) ------------------------------------------------

def truth_producer(num_trajectories=2560, batch_size=128, seed=0, methods=tuple(METHODS)):
    """A bench_solvers row producer: (label, nfe, samples) for each AMED method at every NFE in 3..10 of the
    benchmark's list, each predictor trained against the problem's own exact denoiser on the problem's sigma range.
    Labels 'amed' (AMED-Solver) and 'amed_ipndm' (AMED-Plugin on iPNDM)."""
    labels = {'AMED-Solver': 'amed', 'AMED-Plugin(iPNDM)': 'amed_ipndm'}

    def produce(problem, nfes):
        module = AMEDPredictor()
        for method in methods:
            spec = METHODS[method]
            for nfe in (n for n in nfes if 3 <= n <= 10):
                num_points, afs = grid_for(nfe)
                sigmas, teacher_sigmas = amed_train.grids(
                    schedule=spec['schedule'], num_points=num_points, sigma_min=problem.sigma_min,
                    sigma_max=problem.sigma_max, extra_points=spec['extra_points'])
                params, _ = amed_train.train_predictor(
                    lambda _: problem.denoiser, (), module, sample_shape=problem.x_T.shape[1:], sigmas=sigmas,
                    teacher_sigmas=teacher_sigmas, base=spec['base'], afs=afs, teacher=spec['teacher'],
                    extra_points=spec['extra_points'], num_trajectories=num_trajectories, batch_size=batch_size,
                    seed=seed)
                out, info = samplers.get('amed', predictor=(module, params), base=spec['base'], afs=afs)(
                    problem.denoiser, problem.x_T, sigmas)
                if info['nfe'] != nfe:
                    raise AssertionError(f'{method}: NFE {info["nfe"]} != planned {nfe}')
                yield labels[method], nfe, out

    return produce


def run_truth_benchmark(config_path, workdir, **producer_options):
    """bench_solvers.run on `config_path` with the AMED rows registered (and removed again afterwards)."""
    from jaxdiff import bench_solvers
    producer = truth_producer(**producer_options)
    bench_solvers.ROW_PRODUCERS.append(producer)
    try:
        return bench_solvers.run(load_config(config_path), workdir)
    finally:
        bench_solvers.ROW_PRODUCERS.remove(producer)


# --- the standalone benchmark's settings (exact denoisers) ----------------------------------------------------

def mixture_setting(dtype):
    """A 3-component isotropic mixture of 4x4x3 images (unequal weights and widths)."""
    rng = np.random.default_rng(0)
    return analytic.GaussianMixture(jnp.asarray(rng.normal(size=(3, 4, 4, 3)), dtype),
                                    jnp.asarray([0.2, 0.3, 0.1], dtype), jnp.asarray([0.5, 0.3, 0.2], dtype))


def digits_setting(dtype):
    """The empirical distribution of the digits training set (16x16x1): its exact denoiser."""
    from jaxdiff.data import digits
    return analytic.Empirical(jnp.asarray(digits.Digits(shape=(16, 16, 1), split='train').images, dtype))


SETTINGS = {'mixture': mixture_setting, 'digits': digits_setting}


def reference_solve(make_target, x_T, num_steps=251, sigma_min=0.002, sigma_max=80.0):
    """Heun on the EDM grid (2 * 251 - 1 = 501 NFE) in float64 with the float64 exact denoiser."""
    previous = jax.config.jax_enable_x64
    jax.config.update('jax_enable_x64', True)
    try:
        target = make_target(jnp.float64)
        sigmas = schedules.get('edm', num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=7.0)
        out, _ = samplers.get('heun')(target.denoiser, jnp.asarray(x_T, jnp.float64), sigmas)
        return np.asarray(out)
    finally:
        jax.config.update('jax_enable_x64', previous)


# --- a trained network (digits): Frechet distance to held-out digits and error against a 501-NFE solve ----------

def load_config(path):
    """get_config() of a config file (e.g. configs/digits_amed.py)."""
    from jaxdiff import config_files
    return config_files.load(path)


def model_rows(config, model_workdir, *, nfes=(5,), methods=tuple(METHODS), num_trajectories=256, batch_size=64,
               num_eval=512, eval_batch=128, seed=0, log=print):
    """Rows {setting='digits_model', method, nfe, error, fd} on the trained network of `model_workdir`: error =
    RMSE against Heun at 501 NFE from the same noise, fd = pixel-space Frechet distance to the held-out digits
    (split 'test'); the exact reference's own fd is a row 'Heun (501 NFE)'. AMED predictors read the real bottleneck."""
    from jaxdiff.data import digits

    from jaxdiff import generate, mesh as mesh_lib
    trained = generate.restore(config, model_workdir, mesh_lib.make_mesh())
    make_denoiser, ema_params = trained.denoiser_fn, trained.variables
    denoiser = make_denoiser(ema_params)
    shape = tuple(config.data.shape)
    held_out = digits.Digits(shape=shape, split='test').images
    x_T = 80.0 * jax.random.normal(jax.random.PRNGKey(54321), (num_eval, *shape), jnp.float32)

    def solve(sampler, sigmas):
        """(samples [num_eval, ...], NFE) in batches of eval_batch; the NFE leaves jit as an output (inside jit the
        grid is traced, so it is a traced int there)."""

        @jax.jit
        def run(x):
            out, info = sampler(denoiser, x, sigmas)
            return out, info['nfe']

        outs, nfes = zip(*(run(x_T[i:i + eval_batch]) for i in range(0, num_eval, eval_batch)))
        return np.concatenate([np.asarray(o) for o in outs]), int(nfes[0])

    def evaluate(method, nfe, sampler, sigmas):
        out, counted = solve(sampler, sigmas)
        if counted != nfe:
            raise AssertionError(f'{method}: NFE {counted} != planned {nfe}')
        row = dict(setting='digits_model', method=method, nfe=nfe, error=rmse(out, reference),
                   fd=metrics.frechet_distance(np.clip(out, -1, 1), held_out))
        log(f'digits_model {method:20s} NFE {nfe:3d}  error {row["error"]:.4f}  fd {row["fd"]:.3f}')
        return row

    reference, _ = solve(samplers.get('heun'), schedules.get('edm', num_steps=251, rho=7.0))
    rows = [dict(setting='digits_model', method='Heun (501 NFE)', nfe=501, error=0.0,
                 fd=metrics.frechet_distance(np.clip(reference, -1, 1), held_out))]
    module = AMEDPredictor(num_bottleneck=amed_train.bottleneck_size(denoiser, shape))
    for nfe in nfes:
        num_points, afs = grid_for(nfe)
        amed_grid, _ = amed_train.grids(schedule='time_uniform', num_points=num_points, sigma_min=0.002,
                                        sigma_max=80.0)
        rows.append(evaluate('DPM-Solver-2', nfe, samplers.get('amed', afs=afs), amed_grid))
        rows.append(evaluate('iPNDM', nfe, samplers.get('ipndm'), schedules.get('edm', num_steps=nfe, rho=7.0)))
        rows.append(evaluate('DPM-Solver++(3M)', nfe, samplers.get('dpmpp_3m'), schedules.get('logsnr',
                                                                                            num_steps=nfe)))
        for method in methods:
            spec = METHODS[method]
            sigmas, teacher_sigmas = amed_train.grids(schedule=spec['schedule'], num_points=num_points,
                                                      sigma_min=0.002, sigma_max=80.0,
                                                      extra_points=spec['extra_points'])
            params, _ = amed_train.train_predictor(
                make_denoiser, ema_params, module, sample_shape=shape, sigmas=sigmas, teacher_sigmas=teacher_sigmas,
                base=spec['base'], afs=afs, teacher=spec['teacher'], extra_points=spec['extra_points'],
                num_trajectories=num_trajectories, batch_size=batch_size, seed=seed)
            sampler = samplers.get('amed', predictor=(module, params), base=spec['base'], afs=afs)
            rows.append(evaluate(method, nfe, sampler, sigmas))
    return rows


def table(rows, nfes):
    methods = list(dict.fromkeys(r['method'] for r in rows))
    lines = ['| method | ' + ' | '.join(f'NFE {n}' for n in nfes) + ' |',
             '|---|' + '---|' * len(nfes)]
    for method in methods:
        errors = {r['nfe']: r['error'] for r in rows if r['method'] == method}
        lines.append(f'| {method} | ' + ' | '.join(f'{errors[n]:.4f}' if n in errors else '-' for n in nfes) + ' |')
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='runs/bench_amed')
    parser.add_argument('--settings', default='mixture,digits')
    parser.add_argument('--nfes', default=','.join(map(str, NFES)))
    parser.add_argument('--methods', default=','.join(METHODS))
    parser.add_argument('--num_trajectories', type=int, default=2560)
    parser.add_argument('--batch_size', type=int, default=128)
    parser.add_argument('--num_eval', type=int, default=512)
    parser.add_argument('--model_config', default='', help='e.g. configs/digits_amed.py: also bench that network')
    parser.add_argument('--model_workdir', default='', help='its trained checkpoint (default: config.amed)')
    parser.add_argument('--model_nfes', default='5')
    parser.add_argument('--model_trajectories', type=int, default=256)
    parser.add_argument('--truth_config', default='', help='configs/bench_solvers.py: the truth benchmark + AMED')
    args = parser.parse_args(argv)
    nfes = tuple(int(n) for n in args.nfes.split(','))
    os.makedirs(args.out, exist_ok=True)
    if args.truth_config:
        return run_truth_benchmark(args.truth_config, args.out, num_trajectories=args.num_trajectories,
                                   batch_size=args.batch_size, methods=tuple(args.methods.split(',')))
    all_rows = []
    for setting in filter(None, args.settings.split(',')):
        make_target = SETTINGS[setting]
        target = make_target(jnp.float32)
        shape = target.means.shape[1:] if hasattr(target, 'means') else target.data.shape[1:]
        x_T = 80.0 * jax.random.normal(jax.random.PRNGKey(12345), (args.num_eval, *shape), jnp.float32)
        reference = reference_solve(make_target, x_T)
        rows = baseline_rows(setting, target.denoiser, x_T, reference, nfes=nfes)
        rows += amed_rows(setting, target.denoiser, x_T, reference, nfes=nfes, methods=args.methods.split(','),
                          num_trajectories=args.num_trajectories, batch_size=args.batch_size)
        print(f'\n{setting}: RMSE per dimension against the 501-NFE float64 Heun solve ({args.num_eval} samples)')
        print(table(rows, nfes), flush=True)
        all_rows += rows
    if args.model_config:
        config = load_config(args.model_config)
        model_nfes = tuple(int(n) for n in args.model_nfes.split(','))
        rows = model_rows(config, args.model_workdir or config.amed.model_workdir, nfes=model_nfes,
                          methods=args.methods.split(','), num_trajectories=args.model_trajectories,
                          num_eval=args.num_eval)
        print('\ndigits model: RMSE against Heun 501 NFE from the same noise; Frechet distance to held-out digits')
        print(table(rows, model_nfes), '\n', table([dict(r, error=r['fd']) for r in rows], model_nfes + (501,)))
        all_rows += rows
    with open(os.path.join(args.out, 'bench_amed.json'), 'w') as f:
        json.dump(all_rows, f, indent=1)
    print(f'rows written to {os.path.join(args.out, "bench_amed.json")}')


if __name__ == '__main__':
    main()
