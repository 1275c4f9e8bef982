"""Training an AMED predictor (used by `--mode=train_amed`, jaxdiff/modes/train_amed.py): fit the AMED predictor to a teacher solver (Zhou, Chen, Wang, Chen, CVPR 2024, Sec. 3.3, Alg. 1).

    python -m jaxdiff.main --config=configs/cifar_amed.py --mode=train_amed --workdir=DIR

No data: each batch starts from fresh latents x_T = sigma_max z. A teacher solver runs on the student's grid refined
by M extra points per interval (Heun, M = 1 for AMED-Solver; iPNDM, M = 2 for the iPNDM plugin); its points at the
student's grid are the targets. Per interval n one Adam step (lr 5e-3) on the squared L2 distance
  L_n = mean_batch || x_{n+1}^student - x_{n+1}^teacher ||^2
Single-step students (AMED-Solver, Euler, DPM-Solver-2 plugins) restart every interval from the teacher point;
multistep students (iPNDM, DPM-Solver++(2M) plugins) continue from their own output with their own history.

Grids (the paper's): N points from sigma_max down to sigma_min, no appended 0. 'time_uniform' (AMED-Solver) is
schedules.time_uniform (uniform in VP time, DPM-Solver's beta 0.1..20; the authors fit beta so that VP time
[1e-3, 1] maps onto [sigma_min, sigma_max], which needs beta_min = -0.005 < 0 (rejected by schedules); the
interior points differ by about 1%); 'edm' with rho = 7 for the plugins. The teacher grid has (N - 1)(M + 1) + 1
points of the same schedule, so the student's points are every (M + 1)-th of it.

The predictor workdir holds `checkpoints/<step>/` (params, via jaxdiff.drivers.checkpoint) and `amed.json` (its sampling
settings: schedule, grid, AFS, base solver, teacher, predictor fields, NFE and the model it was trained for), so
`load_sampler(workdir)` rebuilds the sampler and its grid from the path alone.
"""
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff.drivers import checkpoint as checkpoint_lib
from jaxdiff.core import samplers, schedules
from jaxdiff.core.errors import UserError
from jaxdiff.models.amed_predictor import AMEDPredictor
from jaxdiff.core.samplers import amed
from jaxdiff.core.samplers.common import call_denoiser

SETTINGS_FILE = 'amed.json'
SCHEDULES = ('time_uniform', 'edm', 'logsnr')
TEACHERS = ('heun', 'dpm2', 'ipndm', 'dpmpp_2m', 'dpmpp_3m', 'euler')


# --- grids and teacher ---------------------------------------------------------------------------------------

def grids(*, schedule, num_points, sigma_min, sigma_max, rho=7.0, extra_points=0, schedule_options=None):
    """(student sigmas [num_points], teacher sigmas [(num_points - 1)(extra_points + 1) + 1]); both end at
    sigma_min (no appended 0), the student's points are every (extra_points + 1)-th teacher point.
    schedule_options: further keywords of `schedules.get` (the AMED recipes' time_uniform grid is the authors':
    epsilon_s = 1e-3, VP beta fitted to [sigma_min, sigma_max])."""
    if schedule not in SCHEDULES:
        raise ValueError(f'amed.schedule must be one of {", ".join(SCHEDULES)}, got {schedule!r}')
    if int(num_points) != num_points or num_points < 2:
        raise ValueError(f'amed.num_points must be an integer >= 2, got {num_points!r}')
    if int(extra_points) != extra_points or extra_points < 0:
        raise ValueError(f'amed.extra_points must be an integer >= 0, got {extra_points!r}')
    options = dict(num_steps=(num_points - 1) * (extra_points + 1) + 1, sigma_min=sigma_min, sigma_max=sigma_max)
    if schedule == 'edm':
        options['rho'] = rho
    options.update(dict(schedule_options or {}))
    teacher_sigmas = schedules.get(schedule, **options)[:-1]
    return teacher_sigmas[::extra_points + 1], teacher_sigmas


def make_teacher(make_denoiser, teacher_sigmas, *, teacher, extra_points):
    """jitted (denoiser_params, x_T) -> teacher points at the student grid [N, B, ...] (x_T first)."""
    if teacher not in TEACHERS:
        raise ValueError(f'amed.teacher must be one of {", ".join(TEACHERS)}, got {teacher!r}')
    solve = samplers.get(teacher)

    def points(denoiser_params, x_T):
        _, info = solve(make_denoiser(denoiser_params), x_T, teacher_sigmas, return_trajectory=True)
        return info['trajectory'][::extra_points + 1]

    return jax.jit(points)


# --- the student's per-interval step -----------------------------------------------------------------------

def teacher_matching_loss(x_student, x_teacher):
    """mean over the batch of the squared L2 distance (AMED Alg. 1, the loss at t_{n+1})."""
    return jnp.mean(jnp.sum(jnp.square(x_student - x_teacher).reshape(x_student.shape[0], -1), axis=1))


def interval_loss(params, module, denoiser, x, history, i, t_cur, t_next, target, *, base, afs,
                  lower_order_final=False, num_intervals=None):
    """(L_n, (x_{n+1}, history)): the student's interval i from (x, history) against the teacher point."""
    predict = lambda features, t_a, t_b: module.apply(params, features, t_a, t_b)
    x_next, history = amed.interval(denoiser, predict, (x, history), i, t_cur, t_next, base=base, afs=afs,
                                    num_bottleneck=module.num_bottleneck, lower_order_final=lower_order_final,
                                    num_intervals=num_intervals)
    return teacher_matching_loss(x_next, target), (x_next, history)


def make_interval_step(make_denoiser, module, optimizer, *, base, afs, lower_order_final=False,
                       num_intervals=None):
    """jitted (params, opt_state, denoiser_params, x, history, i, t_cur, t_next, target)
    -> (params, opt_state, loss, x_next, history): one Adam step on L_n. One compilation serves every interval."""
    def step(params, opt_state, denoiser_params, x, history, i, t_cur, t_next, target):
        (loss, (x_next, history)), grads = jax.value_and_grad(interval_loss, has_aux=True)(
            params, module, make_denoiser(denoiser_params), x, history, i, t_cur, t_next, target, base=base,
            afs=afs, lower_order_final=lower_order_final, num_intervals=num_intervals)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, x_next, history

    return jax.jit(step)


def make_round_losses(make_denoiser, module, *, base, afs, max_order=4, lower_order_final=False):
    """jitted (params, denoiser_params, points, sigmas) -> per-interval losses [N - 1] with the training's restart
    rule and no update (to measure what a round did)."""
    def losses(params, denoiser_params, points, sigmas):
        denoiser = make_denoiser(denoiser_params)
        x, history = points[0], amed.init_history(base, points[0], max_order)
        out = []
        for n in range(points.shape[0] - 1):
            loss, (x_next, history) = interval_loss(params, module, denoiser, x, history, n, sigmas[n],
                                                    sigmas[n + 1], points[n + 1], base=base, afs=afs,
                                                    lower_order_final=lower_order_final,
                                                    num_intervals=points.shape[0] - 1)
            x = x_next if base in amed.MULTISTEP_BASES else points[n + 1]
            out.append(loss)
        return jnp.stack(out)

    return jax.jit(losses)


def train_round(step, params, opt_state, denoiser_params, points, sigmas, *, base, max_order=4):
    """One batch of trajectories: one Adam step per interval (Alg. 1). Returns (params, opt_state, losses [N-1])."""
    x, history = points[0], amed.init_history(base, points[0], max_order)
    losses = []
    for n in range(len(sigmas) - 1):
        params, opt_state, loss, x_next, history = step(params, opt_state, denoiser_params, x, history,
                                                        jnp.int32(n), sigmas[n], sigmas[n + 1], points[n + 1])
        x = x_next if base in amed.MULTISTEP_BASES else points[n + 1]
        losses.append(loss)
    return params, opt_state, np.asarray(jax.device_get(losses))


def init_params(module, sigmas, seed=0):
    """Fresh predictor parameters (Flax default initialisers)."""
    zeros = jnp.zeros((1, module.num_bottleneck), jnp.float32)
    return module.init(jax.random.fold_in(jax.random.PRNGKey(seed), 1 << 30), zeros, sigmas[:1], sigmas[1:2])


def train_predictor(make_denoiser, denoiser_params, module, *, sample_shape, sigmas, teacher_sigmas, base=None,
                    afs=True, max_order=4, teacher='heun', extra_points=1, num_trajectories=10_000,
                    batch_size=128, lr=5e-3, seed=0, params=None, log_every=0, lower_order_final=None):
    """Trains `module` (AMEDPredictor) against the teacher; returns (params, mean loss per round [rounds]).

    make_denoiser(denoiser_params) -> D(x, sigma) (with `with_aux` for a network); sample_shape: one example's shape.
    Round k draws x_T = sigma_max z from fold_in(PRNGKey(seed), k), so a run is reproducible. lower_order_final:
    the dpmpp_2m base's last sub-step (None: the authors' True for that base; `samplers.amed`)."""
    key = jax.random.PRNGKey(seed)
    params = init_params(module, sigmas, seed) if params is None else params
    optimizer = optax.adam(lr)
    opt_state = optimizer.init(params)
    step = make_interval_step(make_denoiser, module, optimizer, base=base, afs=afs,
                              lower_order_final=amed.resolve_lower_order_final(base, lower_order_final),
                              num_intervals=len(sigmas) - 1)
    teach = make_teacher(make_denoiser, teacher_sigmas, teacher=teacher, extra_points=extra_points)
    rounds = max(num_trajectories // batch_size, 1)
    history = []
    start = time.time()
    for k in range(rounds):
        x_T = sigmas[0] * jax.random.normal(jax.random.fold_in(key, k), (batch_size, *sample_shape), jnp.float32)
        points = teach(denoiser_params, x_T)
        params, opt_state, losses = train_round(step, params, opt_state, denoiser_params, points, sigmas,
                                                base=base, max_order=max_order)
        history.append(float(np.mean(losses)))
        if not np.isfinite(history[-1]):
            raise UserError(f'AMED training: the teacher-matching loss is NaN/Inf in round {k + 1} '
                            f'(per interval {losses}); check the denoiser, the grid and amed.lr={lr}')
        if log_every and ((k + 1) % log_every == 0 or k + 1 == rounds):
            print(f'round {k + 1}/{rounds}: teacher-matching loss {history[-1]:.4g} '
                  f'(per interval {np.array2string(losses, precision=3)}), {time.time() - start:.0f}s', flush=True)
    return params, np.asarray(history)


def learned_steps(module, params, sigmas, features=None):
    """(r, c, a) [N - 1] the predictor gives per interval for `features` [1, P] (default zeros: a denoiser
    without a bottleneck, where the predictor is a learned per-step schedule)."""
    features = jnp.zeros((1, module.num_bottleneck), jnp.float32) if features is None else features
    out = [module.apply(params, features, sigmas[n:n + 1], sigmas[n + 1:n + 2]) for n in range(len(sigmas) - 1)]
    return tuple(np.asarray([float(o[j][0]) for o in out]) for j in range(3))


def bottleneck_size(denoiser, sample_shape):
    """H * W of the denoiser's aux bottleneck (jax.eval_shape, nothing runs); 64 when it has none."""
    x = jax.ShapeDtypeStruct((1, *sample_shape), jnp.float32)
    _, aux = jax.eval_shape(lambda x: call_denoiser(denoiser, x, jnp.ones((1,)), with_aux=True), x)
    bottleneck = aux.get('bottleneck')
    return 64 if bottleneck is None else int(bottleneck.shape[1] * bottleneck.shape[2])


# --- the predictor checkpoint ------------------------------------------------------------------------------

def predictor_fields(module):
    return dict(num_bottleneck=module.num_bottleneck, hidden=module.hidden,
                bottleneck_features=module.bottleneck_features, time_channels=module.time_channels,
                eps_c=module.eps_c, eps_a=module.eps_a)


def save_predictor(workdir, params, settings, step=0):
    """Writes WORKDIR/checkpoints/<step>/ (params) and WORKDIR/amed.json (settings: everything sampling needs)."""
    os.makedirs(workdir, exist_ok=True)
    checkpoints = checkpoint_lib.Checkpoints(workdir, keep_checkpoints=1)
    try:
        checkpoints.save(step, {'params': params}, force=True)
        checkpoints.wait_until_finished()
    finally:
        checkpoints.close()
    with open(os.path.join(workdir, SETTINGS_FILE), 'w') as f:
        json.dump(settings, f, indent=2, sort_keys=True)


def load_predictor(workdir):
    """(module, params, settings) from a `train_amed` workdir; UserError naming the path when unreadable."""
    path = os.path.join(os.path.abspath(workdir), SETTINGS_FILE)
    if not os.path.isfile(path):
        raise UserError(f'no AMED predictor in {workdir}: {path} does not exist (run --mode=train_amed first)')
    with open(path) as f:
        settings = json.load(f)
    module = AMEDPredictor(**settings['predictor'])
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, module.num_bottleneck)),
                                                jnp.ones((1,)), jnp.ones((1,))))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    _, state = checkpoint_lib.restore_latest(workdir, checkpoint_lib.abstract_like({'params': shapes}, sharding))
    return module, state['params'], settings


def load_sampler(workdir, *, nfe=None, model=None):
    """(sampler, sigmas, settings) from a predictor workdir alone. `nfe` and `model` (the description the
    predictor was trained for, see `describe_model`), when given, must match: a mismatch is a UserError."""
    module, params, settings = load_predictor(workdir)
    if nfe is not None and int(nfe) != settings['nfe']:
        raise UserError(f'the AMED predictor in {workdir} was trained for NFE {settings["nfe"]} '
                        f'(N={settings["num_points"]}, afs={settings["afs"]}), not NFE {nfe}: train one for it')
    if model is not None and _canonical(model) != _canonical(settings['model']):
        raise UserError(f'the AMED predictor in {workdir} was trained for model {settings["model"]}, '
                        f'not {model}: train one for this model')
    sampler = samplers.get('amed', predictor=(module, params), base=settings['base'], afs=settings['afs'],
                           lower_order_final=settings.get('lower_order_final', False),
                           max_order=settings['max_order'])
    sigmas, _ = grids(schedule=settings['schedule'], num_points=settings['num_points'],
                      sigma_min=settings['sigma_min'], sigma_max=settings['sigma_max'], rho=settings['rho'],
                      schedule_options=settings.get('schedule_options'))
    return sampler, sigmas, settings


def _canonical(description):
    return json.loads(json.dumps(description, sort_keys=True))


def make_settings(module, *, model, schedule, num_points, sigma_min, sigma_max, rho, afs, base, max_order, teacher,
                  extra_points, num_trajectories, batch_size, lr, seed, schedule_options=None, lower_order_final=None):
    """The predictor checkpoint's settings (JSON-able): what sampling needs, and how it was trained. The NFE is
    the sampler's own declaration for the grid (no appended 0)."""
    nfe = samplers.get('amed', afs=bool(afs)).nfe(int(num_points), ends_at_zero=False)
    return dict(model=model, schedule=schedule, schedule_options=dict(schedule_options or {}),
                num_points=int(num_points), sigma_min=float(sigma_min), sigma_max=float(sigma_max), rho=float(rho),
                afs=bool(afs), base=base, max_order=int(max_order),
                lower_order_final=amed.resolve_lower_order_final(base, lower_order_final), nfe=int(nfe),
                teacher=teacher, extra_points=int(extra_points), num_trajectories=int(num_trajectories),
                batch_size=int(batch_size), lr=float(lr), seed=int(seed), predictor=predictor_fields(module))
