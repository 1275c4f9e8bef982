"""AMED-Solver and AMED-Plugin(iPNDM) (Zhou, Chen, Wang, Chen, CVPR 2024) at NFE 3..10 on exact denoisers.

Two entries, both `python -m jaxdiff.main --mode=bench`:
  - configs/bench_amed.py: this module's own table (`run`): truth problems (a 4x4x3 mixture, the 16x16 digits
    empirical distribution) and baselines, optionally a trained digits network (`bench.model_config`: Frechet
    distance to held-out digits, error against a 501-NFE solve);
  - configs/bench_solvers.py with bench.amed_rows=True: AMED rows in the solver table (`truth_rows`).

For every NFE a predictor is trained (amed_train.train_predictor, the paper's recipe: fresh latents, teacher with M
extra points per interval, one Adam step per interval at lr 5e-3) against the exact denoiser itself, then sampled
from held-out noise. Odd NFE uses AFS, even NFE does not; the grid length for an NFE is the sampler's own
declaration (`samplers.get('amed', afs=...).num_points_for(nfe, ends_at_zero=False)`: NFE = 2 (N - 1) - [AFS]).
The AMED-Solver grid is the authors' time-uniform one (schedules.time_uniform with epsilon_s = 1e-3: VP time uniform
on [1e-3, 1], beta fitted to [sigma_min, sigma_max]); the iPNDM plugin's is EDM's rho = 7 grid.
An exact denoiser has no UNet bottleneck, so the predictor's bottleneck input is zeros and it reads only
(t_n, t_{n+1}): here AMED learns a per-step schedule (r_n, c_n), not a per-sample one.

Error: RMSE per dimension, sqrt(mean_b |x_b - x_ref,b|^2 / d), against the reference solve from the same noise
(Heun, 500 NFE on the EDM grid, float64 with the float64 twin of the exact denoiser; SPEC.md 'Ground truth').
Baselines on the same noise: DPM-Solver-2 (AMED with r = 1/2 on the AMED-Solver grid), iPNDM (EDM rho = 7 grid) and
DPM-Solver++(3M) (log-SNR grid), each with NFE = number of steps (the last into sigma = 0).
"""
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.drivers import amed_train
from jaxdiff.core import metrics, samplers, schedules
from jaxdiff.bench import problems as problems_lib
from jaxdiff.core.errors import UserError
from jaxdiff.models.amed_predictor import AMEDPredictor

NFES = (3, 4, 5, 6, 7, 8, 9, 10)
# the paper's two recipes (Zhou et al. 2024, Sec. 4 / App. C)
METHODS = {
    'AMED-Solver': dict(base=None, schedule='time_uniform', schedule_options={'epsilon_s': 1e-3}, teacher='heun',
                        extra_points=1),
    'AMED-Plugin(iPNDM)': dict(base='ipndm', schedule='edm', schedule_options={'rho': 7.0}, teacher='ipndm',
                               extra_points=2),
}
TRUTH_LABELS = {'AMED-Solver': 'amed', 'AMED-Plugin(iPNDM)': 'amed_ipndm'}   # row labels in the solver table


def grid_for(nfe):
    """(num_points, afs) of AMED at `nfe` calls: AFS on odd NFE, grid length from the sampler's declared cost."""
    afs = nfe % 2 == 1
    return samplers.get('amed', afs=afs).num_points_for(nfe, ends_at_zero=False), afs


def grids(spec, num_points, sigma_min, sigma_max):
    """(student sigmas [num_points], teacher sigmas) of `spec` on AMED's grids (no appended 0): the teacher grid
    has (N - 1)(M + 1) + 1 points of the schedule, the student's are every (M + 1)-th (amed_train.grids' rule,
    here with the schedule's options)."""
    step = spec['extra_points'] + 1
    teacher_sigmas = schedules.get(spec['schedule'], num_steps=(num_points - 1) * step + 1, sigma_min=sigma_min,
                                   sigma_max=sigma_max, **spec['schedule_options'])[:-1]
    return teacher_sigmas[::step], teacher_sigmas


def settings_for(spec, num_points, afs, sigma_min, sigma_max, **fields):
    """The amed_train.Settings of `spec` on its grid (`grids`: the same sigmas), with `fields` (num_trajectories,
    batch_size, seed) and no progress lines."""
    return amed_train.Settings(base=spec['base'], schedule=spec['schedule'],
                               schedule_options=dict(spec['schedule_options']), num_points=num_points,
                               sigma_min=sigma_min, sigma_max=sigma_max, afs=afs, teacher=spec['teacher'],
                               extra_points=spec['extra_points'], log_every_rounds=0, **fields)


def rmse(x, reference):
    return float(metrics.endpoint_rmse(np.asarray(x, np.float64), np.asarray(reference, np.float64)))


def train_and_sample(method, nfe, make_denoiser, denoiser_params, module, x_T, *, sigma_min, sigma_max,
                     num_trajectories, batch_size, seed):
    """(samples from x_T, learned (r, c, a) per interval, train losses, seconds) of `method` at `nfe`."""
    spec = METHODS[method]
    num_points, afs = grid_for(nfe)
    sigmas, _ = grids(spec, num_points, sigma_min, sigma_max)
    start = time.time()
    params, losses = amed_train.train_predictor(
        make_denoiser, denoiser_params, module,
        settings_for(spec, num_points, afs, sigma_min, sigma_max, num_trajectories=num_trajectories,
                     batch_size=batch_size, seed=seed), sample_shape=x_T.shape[1:])
    seconds = time.time() - start
    sampler = samplers.get('amed', predictor=(module, params), base=spec['base'], afs=afs)
    out, info = sampler(make_denoiser(denoiser_params), x_T, sigmas)
    if info['nfe'] != nfe:
        raise AssertionError(f'{method}: NFE {info["nfe"]} != declared {nfe}')
    return out, amed_train.learned_steps(module, params, sigmas), losses, seconds


# --- rows in the solver table (bench/solvers.py with bench.amed_rows) -----------------------------------------------

def truth_rows(problem, nfes, *, num_trajectories=2560, batch_size=128, seed=0, methods=tuple(METHODS)):
    """(label, nfe, samples) for each AMED method at every NFE of `nfes` in 3..10, each predictor trained against
    the problem's own exact denoiser on the problem's sigma range, sampled from its x_T. Labels 'amed'
    (AMED-Solver) and 'amed_ipndm' (AMED-Plugin on iPNDM)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f'bench.amed.methods: unknown {", ".join(unknown)}; valid: {", ".join(METHODS)}')
    module = AMEDPredictor()
    for method in methods:
        for nfe in (n for n in nfes if 3 <= n <= 10):
            out, *_ = train_and_sample(method, nfe, lambda _: problem.denoiser, (), module, problem.x_T,
                                       sigma_min=problem.sigma_min, sigma_max=problem.sigma_max,
                                       num_trajectories=num_trajectories, batch_size=batch_size, seed=seed)
            yield TRUTH_LABELS[method], nfe, out


# --- this module's own table ------------------------------------------------------------------------------------

def amed_rows(setting, denoiser, x_T, reference, *, nfes=NFES, methods=tuple(METHODS), sigma_min=0.002,
              sigma_max=80.0, num_trajectories=2560, batch_size=128, seed=0, log=print):
    """Rows {setting, method, nfe, error, r, c, train_s} for the AMED methods at each NFE. `denoiser` is exact
    (no bottleneck), x_T [B, ...] held-out start noise (sigma_max z), reference the reference solve from x_T."""
    rows = []
    module = AMEDPredictor()
    for method in methods:
        for nfe in nfes:
            out, (r, c, _), losses, seconds = train_and_sample(
                method, nfe, lambda _: denoiser, (), module, x_T, sigma_min=sigma_min, sigma_max=sigma_max,
                num_trajectories=num_trajectories, batch_size=batch_size, seed=seed)
            rows.append(dict(setting=setting, method=method, nfe=nfe, error=rmse(out, reference),
                             r=[round(float(v), 3) for v in r], c=[round(float(v), 4) for v in c],
                             loss_first=float(losses[0]), loss_last=float(losses[-1]), train_s=round(seconds, 1)))
            log(f'{setting:14s} {method:20s} NFE {nfe:2d}  error {rows[-1]["error"]:.4f}  r {rows[-1]["r"]}  '
                f'({seconds:.0f}s)')
    return rows


def baselines(nfe, sigma_min, sigma_max):
    """(method, sampler, grid) of the baselines at `nfe`: DPM-Solver-2 (r = 1/2 on the AMED-Solver grid and AFS
    plan), iPNDM (EDM rho 7), DPM-Solver++(3M) (log-SNR)."""
    num_points, afs = grid_for(nfe)
    amed_grid, _ = grids(METHODS['AMED-Solver'], num_points, sigma_min, sigma_max)
    return (('DPM-Solver-2', samplers.get('amed', afs=afs), amed_grid),
            ('iPNDM', samplers.get('ipndm'), schedules.get('edm', num_steps=nfe, sigma_min=sigma_min,
                                                           sigma_max=sigma_max, rho=7.0)),
            ('DPM-Solver++(3M)', samplers.get('dpmpp_3m'), schedules.get('logsnr', num_steps=nfe,
                                                                         sigma_min=sigma_min, sigma_max=sigma_max)))


def baseline_rows(setting, denoiser, x_T, reference, *, nfes=NFES, sigma_min=0.002, sigma_max=80.0):
    rows = []
    for nfe in nfes:
        for method, sampler, sigmas in baselines(nfe, sigma_min, sigma_max):
            out, info = sampler(denoiser, x_T, sigmas)
            if info['nfe'] != nfe:
                raise AssertionError(f'{method}: NFE {info["nfe"]} != {nfe}')
            rows.append(dict(setting=setting, method=method, nfe=nfe, error=rmse(out, reference)))
    return rows


def reference_solve(problem, x_T, num_steps=251, sigma_min=0.002, sigma_max=80.0):
    """Heun on the EDM grid (2 * 251 - 1 = 501 NFE) in float64 with the problem's float64 twin."""
    with jax.enable_x64(True):
        sigmas = schedules.get('edm', num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=7.0)
        out, _ = samplers.get('heun')(problem.target(jnp.float64).denoiser, jnp.asarray(x_T, jnp.float64), sigmas)
        return np.asarray(out)


# --- a trained network (digits): Frechet distance to held-out digits and error against a 501-NFE solve ----------

def model_rows(config, model_workdir, *, nfes=(5,), methods=tuple(METHODS), num_trajectories=256, batch_size=64,
               num_eval=512, eval_batch=128, seed=0, log=print):
    """Rows {setting='digits_model', method, nfe, error, fd} on the trained network of `model_workdir`: error =
    RMSE against Heun at 501 NFE from the same noise, fd = pixel-space Frechet distance to the held-out digits
    (split 'test'); the exact reference's own fd is a row 'Heun (501 NFE)'. AMED predictors read the real bottleneck."""
    from jaxdiff.drivers import mesh as mesh_lib, trained as trained_lib
    from jaxdiff.data import digits

    trained = trained_lib.restore(config, model_workdir, mesh_lib.make_mesh())
    make_denoiser, ema_params = trained.denoiser_fn, trained.variables
    denoiser = make_denoiser(ema_params)
    shape = tuple(config.data.shape)
    held_out = digits.Digits(shape=shape, split='test').images
    x_T = 80.0 * jax.random.normal(jax.random.key(54321), (num_eval, *shape), jnp.float32)

    def solve(sampler, sigmas):
        """(samples [num_eval, ...], NFE) in batches of eval_batch; the NFE leaves jit as an output."""

        @jax.jit
        def run(x):
            out, info = sampler(denoiser, x, sigmas)
            return out, info['nfe']

        outs, counted = zip(*(run(x_T[i:i + eval_batch]) for i in range(0, num_eval, eval_batch)))
        return np.concatenate([np.asarray(o) for o in outs]), int(counted[0])

    def evaluate(method, nfe, sampler, sigmas):
        out, counted = solve(sampler, sigmas)
        if counted != nfe:
            raise AssertionError(f'{method}: NFE {counted} != declared {nfe}')
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
        for method, sampler, sigmas in baselines(nfe, 0.002, 80.0):
            rows.append(evaluate(method, nfe, sampler, sigmas))
        for method in methods:
            spec = METHODS[method]
            sigmas, _ = grids(spec, num_points, 0.002, 80.0)
            params, _ = amed_train.train_predictor(
                make_denoiser, ema_params, module,
                settings_for(spec, num_points, afs, 0.002, 80.0, num_trajectories=num_trajectories,
                             batch_size=batch_size, seed=seed), sample_shape=shape)
            sampler = samplers.get('amed', predictor=(module, params), base=spec['base'], afs=afs)
            rows.append(evaluate(method, nfe, sampler, sigmas))
    return rows


def table(rows, nfes, value='error'):
    methods = list(dict.fromkeys(r['method'] for r in rows))
    lines = ['| method | ' + ' | '.join(f'NFE {n}' for n in nfes) + ' |',
             '|---|' + '---|' * len(nfes)]
    for method in methods:
        cells = {r['nfe']: r[value] for r in rows if r['method'] == method}
        lines.append(f'| {method} | ' + ' | '.join(f'{cells[n]:.4f}' if n in cells else '-' for n in nfes) + ' |')
    return '\n'.join(lines)


def run(config, workdir):
    """The AMED table of configs/bench_amed.py: per truth problem the baselines and the AMED methods at every NFE,
    then (bench.model_config set) the trained network's rows; writes WORKDIR/bench_amed.json."""
    if not workdir:
        raise UserError('--workdir is required for the AMED benchmark (bench_amed.json is written there)')
    b = config.bench
    methods = tuple(b.methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f'bench.methods: unknown {", ".join(unknown)}; valid: {", ".join(METHODS)}')
    os.makedirs(workdir, exist_ok=True)
    nfes = tuple(int(n) for n in b.nfes)
    all_rows = []
    for name in b.problems:
        problem = problems_lib.get(name, **dict(b.problem_options.get(name, {})))
        x_T = b.sigma_max * jax.random.normal(problem.noise_key(b.seed), (b.num_eval, *problem.shape), jnp.float32)
        reference = reference_solve(problem, x_T, sigma_min=b.sigma_min, sigma_max=b.sigma_max)
        rows = baseline_rows(name, problem.denoiser, x_T, reference, nfes=nfes, sigma_min=b.sigma_min,
                             sigma_max=b.sigma_max)
        rows += amed_rows(name, problem.denoiser, x_T, reference, nfes=nfes, methods=methods,
                          sigma_min=b.sigma_min, sigma_max=b.sigma_max, num_trajectories=b.num_trajectories,
                          batch_size=b.batch_size, seed=b.seed)
        print(f'\n{name}: RMSE per dimension against the 501-NFE float64 Heun solve ({b.num_eval} samples)')
        print(table(rows, nfes), flush=True)
        all_rows += rows
    if b.model_config:
        from jaxdiff.drivers import config_files
        model_config = config_files.load(b.model_config)
        model_nfes = tuple(int(n) for n in b.model_nfes)
        rows = model_rows(model_config, b.model_workdir or model_config.amed.model_workdir, nfes=model_nfes,
                          methods=methods, num_trajectories=b.model_trajectories, num_eval=b.num_eval)
        print('\ndigits model: RMSE against Heun 501 NFE from the same noise; Frechet distance to held-out digits')
        print(table(rows, model_nfes), '\n', table(rows, model_nfes + (501,), value='fd'))
        all_rows += rows
    path = os.path.join(workdir, 'bench_amed.json')
    with open(path, 'w') as f:
        json.dump(all_rows, f, indent=1)
    print(f'rows written to {path}')
    return all_rows
