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

config.amed is read once into `Settings` (`settings_of`, checked by config_check's table style); the trainer runs
on `jaxdiff.drivers.loop`, one round (one batch of trajectories, one Adam step per interval) per loop step. The
predictor workdir holds `checkpoints/<round>/` (items 'state': AMEDState to resume, 'ema': {'params'} to sample
with, via jaxdiff.drivers.checkpoint) and `amed.json` (its sampling settings: schedule, grid, AFS, base solver,
teacher, predictor fields, NFE and the model it was trained for), so `load_sampler(workdir)` rebuilds the sampler
and its grid from the path alone. A run resumes from its newest readable checkpoint bit-identically (round k
draws from fold_in(key(seed), k)) and saves and stops on SIGTERM/SIGINT.
"""
import dataclasses
import json
import os
import time
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff.drivers import checkpoint as checkpoint_lib, config_check, loop
from jaxdiff.core import samplers, schedules
from jaxdiff.core.errors import UserError
from jaxdiff.models.amed_predictor import AMEDPredictor
from jaxdiff.core.samplers import amed
from jaxdiff.core.samplers.common import call_with_aux

SETTINGS_FILE = 'amed.json'
SCHEDULES = ('time_uniform', 'edm', 'logsnr')
TEACHERS = ('heun', 'dpm2', 'ipndm', 'dpmpp_2m', 'dpmpp_3m', 'euler')
KEEP_CHECKPOINTS = 2


# --- settings: config.amed ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Settings:
    """config.amed (configs/cifar_amed.py lists every field; the names are those of the arguments they feed)."""
    model_workdir: Optional[str] = None   # the trained model's workdir (the mode's; unused by `train_predictor`)
    base: Optional[str] = None            # None: AMED-Solver; euler | dpm2 | ipndm | dpmpp_2m: the AMED-Plugin
    schedule: str = 'time_uniform'        # the student's and the teacher's grid (`grids`)
    schedule_options: dict = dataclasses.field(default_factory=dict)   # further keywords of `schedules.get`
    num_points: int = 4                   # N: the student's grid points (no appended 0)
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0                      # the 'edm' schedule's
    afs: bool = True                      # analytical first step
    max_order: int = 4                    # the multistep bases' history
    lower_order_final: Optional[bool] = None   # None: True on the dpmpp_2m base (`samplers.amed`)
    teacher: str = 'heun'                 # the teacher solver on the refined grid
    extra_points: int = 1                 # M: teacher points per student interval
    eps_c: float = 0.01                   # the predictor's output ranges (AMEDPredictor)
    eps_a: float = 0.0
    num_trajectories: int = 10_000        # rounds = num_trajectories // batch_size
    batch_size: int = 128
    lr: float = 5e-3
    seed: int = 0
    log_every_rounds: int = 10            # 0: no progress lines
    checkpoint_every_rounds: int = 10     # and at the end, and on SIGTERM/SIGINT (a run with a workdir)

    @property
    def num_rounds(self):
        return max(self.num_trajectories // self.batch_size, 1)

    def grids(self):
        """(student sigmas, teacher sigmas) of these settings (`grids`)."""
        return grids(schedule=self.schedule, num_points=self.num_points, sigma_min=self.sigma_min,
                     sigma_max=self.sigma_max, rho=self.rho, extra_points=self.extra_points,
                     schedule_options=self.schedule_options)


TABLE = {
    'model_workdir': config_check.ANY, 'base': config_check.choice(*amed.BASES),
    'schedule': config_check.choice(*SCHEDULES), 'schedule_options': config_check.ANY,
    'num_points': config_check.integer(2), 'sigma_min': config_check.number(0.0, open_lower=True),
    'sigma_max': config_check.number(0.0, open_lower=True), 'rho': config_check.number(0.0, open_lower=True),
    'afs': config_check.FLAG, 'max_order': config_check.integer(1),
    'lower_order_final': config_check.Rule('bool', optional=True), 'teacher': config_check.choice(*TEACHERS),
    'extra_points': config_check.integer(0), 'eps_c': config_check.number(0.0), 'eps_a': config_check.number(0.0),
    'num_trajectories': config_check.integer(1), 'batch_size': config_check.integer(1),
    'lr': config_check.number(0.0, open_lower=True), 'seed': config_check.integer(0),
    'log_every_rounds': config_check.integer(0), 'checkpoint_every_rounds': config_check.integer(0),
}


def settings_of(config):
    """Settings of config.amed (checked against TABLE; fields left out take the Settings defaults)."""
    defaults = {f.name: getattr(Settings(), f.name) for f in dataclasses.fields(Settings)}
    values = config_check.section(config, 'amed', TABLE, defaults,
                                  missing='config.amed is missing (see configs/cifar_amed.py)')
    return Settings(**{**values, 'schedule_options': dict(values['schedule_options'] or {})})


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
    return module.init(jax.random.fold_in(jax.random.key(seed), 1 << 30), zeros, sigmas[:1], sigmas[1:2])


def predictor_module(settings, denoiser, sample_shape):
    """The AMEDPredictor of `settings` for `denoiser` (its bottleneck's size, `bottleneck_size`)."""
    return AMEDPredictor(num_bottleneck=bottleneck_size(denoiser, sample_shape), eps_c=settings.eps_c,
                         eps_a=settings.eps_a)


class AMEDState(NamedTuple):
    step: Any          # int32 scalar: rounds done
    params: Any
    opt_state: Any


def train_predictor(make_denoiser, denoiser_params, module, settings, *, sample_shape, workdir=None, model=None):
    """Trains `module` (AMEDPredictor) against the teacher of `settings`; returns (params, mean loss per round of
    this run [rounds]).

    make_denoiser(denoiser_params) -> D(x, sigma) (with `with_aux` for a network); sample_shape: one example's shape.
    Round k draws x_T = sigma_max z from fold_in(key(seed), k), so a run is reproducible. With `workdir` the run
    writes amed.json (`describe`, with `model`: what the predictor was trained for) and checkpoints there, resumes
    from its newest readable checkpoint and saves and stops on SIGTERM/SIGINT; without, it runs in memory."""
    sigmas, teacher_sigmas = settings.grids()
    key = jax.random.key(settings.seed)
    optimizer = optax.adam(settings.lr)
    step = make_interval_step(make_denoiser, module, optimizer, base=settings.base, afs=settings.afs,
                              lower_order_final=amed.resolve_lower_order_final(settings.base,
                                                                               settings.lower_order_final),
                              num_intervals=len(sigmas) - 1)
    teach = make_teacher(make_denoiser, teacher_sigmas, teacher=settings.teacher, extra_points=settings.extra_points)
    rounds = settings.num_rounds

    def init():
        params = init_params(module, sigmas, settings.seed)
        return AMEDState(jnp.zeros((), jnp.int32), params, optimizer.init(params))

    checkpoints = None
    if workdir is not None:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, SETTINGS_FILE), 'w') as f:
            json.dump(describe(settings, module, model), f, indent=2, sort_keys=True)
        checkpoints = checkpoint_lib.Checkpoints(workdir, keep_checkpoints=KEEP_CHECKPOINTS)
    try:
        if checkpoints is None:
            start, state = 0, init()
        else:
            abstract = checkpoint_lib.abstract_like(jax.eval_shape(init), _one_device())
            start, state = loop.restore_or_init(checkpoints, abstract, init)
        history, last_losses, clock = [], [None], time.time()

        def step_fn(state, k, x_T):
            points = teach(denoiser_params, x_T)
            params, opt_state, losses = train_round(step, state.params, state.opt_state, denoiser_params, points,
                                                    sigmas, base=settings.base, max_order=settings.max_order)
            history.append(float(np.mean(losses)))
            last_losses[0] = losses
            if not np.isfinite(history[-1]):
                raise UserError(f'AMED training: the teacher-matching loss is NaN/Inf in round {k + 1} '
                                f'(per interval {losses}); check the denoiser, the grid and amed.lr={settings.lr}')
            return AMEDState(jnp.asarray(k + 1, jnp.int32), params, opt_state)

        def on_due(state, done, due):
            if 'log' in due:
                print(f'round {done}/{rounds}: teacher-matching loss {history[-1]:.4g} (per interval '
                      f'{np.array2string(last_losses[0], precision=3)}), {time.time() - clock:.0f}s', flush=True)
            return state

        state = loop.run(
            state, start=start, num_steps=rounds, step_fn=step_fn,
            batch_fn=lambda k: sigmas[0] * jax.random.normal(jax.random.fold_in(key, k),
                                                             (settings.batch_size, *sample_shape), jnp.float32),
            cadence={'log': settings.log_every_rounds, loop.CHECKPOINT: settings.checkpoint_every_rounds},
            on_due=on_due, checkpoints=checkpoints,
            items=lambda state: {'state': state, 'ema': {'params': state.params}})
    finally:
        if checkpoints is not None:
            checkpoints.wait_until_finished()
            checkpoints.close()
    return state.params, np.asarray(history)


def _one_device():
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def learned_steps(module, params, sigmas, features=None):
    """(r, c, a) [N - 1] the predictor gives per interval for `features` [1, P] (default zeros: a denoiser
    without a bottleneck, where the predictor is a learned per-step schedule)."""
    features = jnp.zeros((1, module.num_bottleneck), jnp.float32) if features is None else features
    out = [module.apply(params, features, sigmas[n:n + 1], sigmas[n + 1:n + 2]) for n in range(len(sigmas) - 1)]
    return tuple(np.asarray([float(o[j][0]) for o in out]) for j in range(3))


def bottleneck_size(denoiser, sample_shape):
    """H * W of the denoiser's aux bottleneck (jax.eval_shape, nothing runs); 64 when it has none."""
    x = jax.ShapeDtypeStruct((1, *sample_shape), jnp.float32)
    _, aux = jax.eval_shape(lambda x: call_with_aux(denoiser, x, jnp.ones((1,))), x)
    bottleneck = aux.get('bottleneck')
    return 64 if bottleneck is None else int(bottleneck.shape[1] * bottleneck.shape[2])


# --- the predictor checkpoint ------------------------------------------------------------------------------

def predictor_fields(module):
    return dict(num_bottleneck=module.num_bottleneck, hidden=module.hidden,
                bottleneck_features=module.bottleneck_features, time_channels=module.time_channels,
                eps_c=module.eps_c, eps_a=module.eps_a)


def save_predictor(workdir, params, settings, step=0):
    """Writes WORKDIR/checkpoints/<step>/ (item 'ema': the params) and WORKDIR/amed.json (settings, `describe`:
    everything sampling needs): a predictor workdir from parameters at hand."""
    os.makedirs(workdir, exist_ok=True)
    checkpoints = checkpoint_lib.Checkpoints(workdir, keep_checkpoints=1)
    try:
        checkpoints.save(step, None, ema={'params': params}, force=True)
        checkpoints.wait_until_finished()
    finally:
        checkpoints.close()
    with open(os.path.join(workdir, SETTINGS_FILE), 'w') as f:
        json.dump(settings, f, indent=2, sort_keys=True)


def load_predictor(workdir):
    """(module, params, settings) from a `train_amed` workdir: amed.json and the 'ema' item of its newest readable
    checkpoint; UserError naming the path when unreadable."""
    path = os.path.join(os.path.abspath(workdir), SETTINGS_FILE)
    if not os.path.isfile(path):
        raise UserError(f'no AMED predictor in {workdir}: {path} does not exist (run --mode=train_amed first)')
    with open(path) as f:
        settings = json.load(f)
    module = AMEDPredictor(**settings['predictor'])
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, module.num_bottleneck)),
                                                jnp.ones((1,)), jnp.ones((1,))))
    _, item = checkpoint_lib.restore_latest(workdir, checkpoint_lib.abstract_like({'params': shapes}, _one_device()),
                                            item='ema')
    return module, item['params'], settings


def load_sampler(workdir, *, nfe=None, model=None):
    """(sampler, sigmas) from a predictor workdir alone (the 'amed' entry of drivers/sampling.py's learned
    samplers). `nfe` and `model` (the description the predictor was trained for, see modes/train_amed.py), when
    given, must match its settings: a mismatch is a UserError."""
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
    return sampler, sigmas


def _canonical(description):
    return json.loads(json.dumps(description, sort_keys=True))


def describe(settings, module, model=None):
    """amed.json (JSON-able): what sampling needs, and how the predictor was trained; `model` describes the
    network it was trained for. The NFE is the sampler's own declaration for the grid (no appended 0)."""
    nfe = samplers.get('amed', afs=bool(settings.afs)).nfe(int(settings.num_points), ends_at_zero=False)
    return dict(model=model, schedule=settings.schedule, schedule_options=dict(settings.schedule_options or {}),
                num_points=int(settings.num_points), sigma_min=float(settings.sigma_min),
                sigma_max=float(settings.sigma_max), rho=float(settings.rho), afs=bool(settings.afs),
                base=settings.base, max_order=int(settings.max_order),
                lower_order_final=amed.resolve_lower_order_final(settings.base, settings.lower_order_final),
                nfe=int(nfe), teacher=settings.teacher, extra_points=int(settings.extra_points),
                num_trajectories=int(settings.num_trajectories), batch_size=int(settings.batch_size),
                lr=float(settings.lr), seed=int(settings.seed), predictor=predictor_fields(module))
