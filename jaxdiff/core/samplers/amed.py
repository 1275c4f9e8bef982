"""AMED-Solver and AMED-Plugin: learned mean-direction steps (Zhou, Chen, Wang, Chen, CVPR 2024, arXiv 2312.00094).

sigma-space, d(x, t) = (x - D(x, t)) / t (SPEC.md). For each grid interval t_n -> t_{n+1} (t = sigma):
  d_n = d(x_n, t_n)                       (with AFS on interval 0: d_0 = x_0 / sqrt(1 + t_0^2), no call; Sec. 3.3)
  (r_n, c_n, a_n) = predictor(bottleneck of the call at (x_n, t_n), t_n, t_{n+1})   (zeros: no call / no bottleneck)
  s_n = t_n^(1 - r_n) t_{n+1}^(r_n)        (the intermediate time; geometric interpolation, Eq. 10)
  y_n = first sub-step of the base solver from t_n to s_n
  d_mid = (y_n - D(y_n, a_n s_n)) / s_n   (a_n rescales only the model's time input)
  x_{n+1} = second sub-step from s_n to t_{n+1}, its increment scaled by c_n

Base solvers (`base`), each formula with the symbols above (Eq. 11 is AMED-Solver; Sec. 3.4 the plugin). Every
sub-step is the base solver's own update (ode.euler_update, ode.dpm2_update with the step size h scaled by c_n,
multistep.push / advance), so AMED adds only s_n, a_n and c_n:
  None (AMED-Solver): y = x_n + (s_n - t_n) d_n;  x_{n+1} = x_n + c_n (t_{n+1} - t_n) d_mid             (Eq. 11)
  'dpm2':  y as above; x_{n+1} = x_n + c_n (t_{n+1} - t_n) [d_mid / (2 r_n) + (1 - 1 / (2 r_n)) d_n]
           (DPM-Solver-2 with the learned r; Lu et al. 2022, Alg. 1 in sigma-space)
  'euler': y as above; x_{n+1} = y + c_n (t_{n+1} - s_n) d_mid          (Euler on the grid t_0, s_0, t_1, s_1, ...)
  'ipndm': y = x_n + (s_n - t_n) AB(d_n, ...);  x_{n+1} = y + c_n (t_{n+1} - s_n) AB(d_mid, d_n, ...), AB the
           iPNDM Adams-Bashforth combination (multistep.ipndm_update; DEIS Eq. 24) over the directions of the
           interleaved grid t_0, s_0, t_1, s_1, ..., warm start order min(stored, max_order)
  'dpmpp_2m': y = (s_n/t_n) x_n - expm1(-h) (m0 + D1_0/2) (multistep.dpmpp_update; Lu et al. 2022b, Alg. 2) with
           the data predictions x0_hat of the interleaved grid; x_{n+1} = (t_{n+1}/s_n) y + c_n (increment of the
           same update from s_n to t_{n+1}). `lower_order_final` (default True for this base, the authors' setting
           of their DPM-Solver++ base, diff-sampler's `lower_order_final=True`): the very last sub-step, into
           t_N = sigmas[-1] > 0, is first order, x_N = (t_N/s) y + c (1 - t_N/s) x0_mid.
With r = 1/2, c = a = 1 and base None or 'dpm2', AMED is exactly DPM-Solver-2 (`predictor=None`).

Step into sigma = 0 (grids with the appended 0, SPEC.md): s_n = 0 would divide by zero, so that interval is the
first-order step every base takes there (`dpm2`, `ipndm`, `dpmpp_2m` alike): x_N = x_n - t_n d_n = x0_hat, one call
and no predictor.
AMED's own grids (the paper's) end at sigma_min > 0 instead, and every interval costs two calls.

NFE (honest, counted in tests; declared by the sampler, `sampler.nfe(N, ends_at_zero=False)` and
`sampler.num_points_for(nfe, ends_at_zero=False)`): 2 per interval into sigma > 0, 1 into sigma = 0, minus 1 with
AFS; for N grid points ending above 0: NFE = 2 (N - 1) - [AFS], so NFE 3/5/7/9 = N 3/4/5/6 with AFS.

The predictor is a pure function of explicit parameters: `predictor=(module, params)` with `module.apply(params,
bottleneck [B, P], t_cur [B], t_next [B]) -> (r, c, a)` (models/amed_predictor.py), or any callable
`predict(features, t_cur, t_next) -> (r, c, a)` (features None: it reads no bottleneck). The bottleneck reaches it
through the aux convention of samplers/common.py (`with_aux`), averaged over channels and flattened to [B, H*W].
"""
import functools

import jax
import jax.numpy as jnp

from jaxdiff.core.samplers import common, multistep, ode
from jaxdiff.core.samplers.common import per_example
from jaxdiff.core.samplers.ode import direction

NAME = 'amed'
BASES = (None, 'euler', 'dpm2', 'ipndm', 'dpmpp_2m')
MULTISTEP_BASES = ('ipndm', 'dpmpp_2m')


# --- the predictor -------------------------------------------------------------------------------------------

def constant_predictor(r=0.5, c=1.0, a=1.0):
    """A predict function with fixed (r, c, a) that reads no bottleneck: r = 1/2, c = a = 1 is DPM-Solver-2.
    Scalars or [B] arrays (traced values too, e.g. r under jax.grad)."""
    def predict(features, t_cur, t_next):
        del features, t_cur, t_next
        return r, c, a
    return predict


def resolve_predictor(predictor, params=None):
    """(predict, num_bottleneck) from `predictor`: None (DPM-Solver-2's r, c, a), a Linen module with `params`,
    a (module, params) pair, or a callable predict(features, t_cur, t_next). num_bottleneck None: no aux read."""
    if predictor is None:
        return constant_predictor(), None
    if isinstance(predictor, tuple):
        if len(predictor) != 2 or params is not None:
            raise ValueError('amed: predictor must be None, a callable, a module with params=, or (module, params)')
        predictor, params = predictor
    if hasattr(predictor, 'apply') and hasattr(predictor, 'num_bottleneck'):
        if params is None:
            raise ValueError('amed: a predictor module needs its parameters: predictor=(module, params)')
        module = predictor
        return (lambda features, t_cur, t_next: module.apply(params, features, t_cur, t_next)), module.num_bottleneck
    if params is not None:
        raise ValueError('amed: params= is only for a predictor module')
    if callable(predictor):
        return predictor, None
    raise ValueError(f'amed: predictor must be None, a callable, or (module, params); got {type(predictor).__name__}')


def bottleneck_features(aux, batch, num_bottleneck, dtype=jnp.float32):
    """The predictor's bottleneck input: aux['bottleneck'] [B, h, w, C] averaged over channels, flattened to
    [B, h*w]; zeros [B, num_bottleneck] for a denoiser without a bottleneck (e.g. analytic ones)."""
    bottleneck = aux.get('bottleneck')
    if bottleneck is None:
        return jnp.zeros((batch, num_bottleneck), dtype)
    features = jnp.mean(bottleneck, axis=-1).reshape(batch, -1).astype(dtype)
    if features.shape[1] != num_bottleneck:
        raise ValueError(f'amed: the predictor was built for a {num_bottleneck}-value bottleneck but the denoiser '
                         f'returns {tuple(bottleneck.shape[1:3])} = {features.shape[1]} values (wrong model?)')
    return features


# --- base-solver history (multistep bases carry past model outputs across sub-steps) -----------------------

def init_history(base, x, max_order=4):
    """The empty history of `base` (a multistep.History, newest first): iPNDM keeps the last max_order directions d,
    DPM-Solver++(2M) the last 2 x0_hat, each with its sigma per example (the intermediate times s_n differ across
    the batch); single-step bases keep nothing, ()."""
    if base not in MULTISTEP_BASES:
        return ()
    return multistep.empty_history(max_order if base == 'ipndm' else 2, x, jnp.ones(x.shape[:1], x.dtype))


def _multistep_substep(base, x, history, value, t, u, c=1.0, first_order=False):
    """Pushes (value, t) into the history and steps the multistep base from t to u with order min(stored, max)
    (1 where `first_order`, a bool or traced bool: lower_order_final's last sub-step), by the base's own update
    (multistep.advance: iPNDM x_u = x + (u - t) sum_j w_j d_j; DPM-Solver++(2M) x_u = (u/t) x - expm1(-h)
    (m0 + D1_0 / 2)). AMED-Plugin scales the increment over the base's free part (x, resp. (u/t) x) by c.
    Returns (x_u, history)."""
    history = multistep.push(history, value, t)
    u_x = per_example(u, x)
    order = jnp.where(first_order, 1, history.count)
    x_u = multistep.advance('ipndm' if base == 'ipndm' else 'dpmpp', x, history, u_x, order)
    free = x if base == 'ipndm' else (u_x / per_example(history.sigmas[0], x)) * x
    return free + per_example(c, x) * (x_u - free), history


# --- one interval ----------------------------------------------------------------------------------------------

def _evaluate(denoiser, x, t, i, state, afs, num_bottleneck):
    """(x0_hat, the predictor's bottleneck features, state) at (x, t), the call counted in the state; with `afs`,
    interval i == 0 uses the AFS direction instead of a call (lax.cond: only the taken branch runs and counts)."""
    batch = x.shape[0]

    def call():
        if num_bottleneck is None:
            x0_hat, evaluated = common.evaluate(denoiser, x, t, state)
            return x0_hat, None, evaluated
        x0_hat, aux, evaluated = common.evaluate_with_aux(denoiser, x, t, state)
        return x0_hat, bottleneck_features(aux, batch, num_bottleneck), evaluated

    if not afs:
        return call()

    def analytic_first_step():
        features = None if num_bottleneck is None else jnp.zeros((batch, num_bottleneck), jnp.float32)
        return x - t * common.afs_direction(x, t), features, state

    return jax.lax.cond(i == 0, analytic_first_step, call)


def amed_step(denoiser, state, i, t_cur, t_next, *, predict, base=None, afs=False, num_bottleneck=None,
              lower_order_final=False, num_intervals=None):
    """One AMED interval t_cur -> t_next as a fixed-grid step (common.State: x, the base's history as memory, the
    counted evaluations). The formulas per base are in the module docstring; each sub-step is the base solver's
    own update (ode.euler_update, ode.dpm2_update, multistep.advance) with AMED's s_n and c_n.
    A pure function of `predict`'s closed-over parameters, so jax.grad flows through r, c, a (and through r into
    the second denoiser call via s_n). lower_order_final (dpmpp_2m base): interval i == num_intervals - 1 (the last
    of the grid) ends with a first-order sub-step."""
    if lower_order_final and num_intervals is None:
        raise ValueError('amed.interval: lower_order_final needs num_intervals (len(sigmas) - 1)')
    x, history = state.x, state.memory
    x0_hat, features, state = _evaluate(denoiser, x, t_cur, i, state, afs, num_bottleneck)
    d_cur = direction(x, x0_hat, t_cur)

    def into_zero():
        # first order into sigma = 0 for every base (as dpm2, ipndm, dpmpp_2m do): x_N = x_n - t_n d_n = x0_hat
        return state._replace(x=x0_hat)

    def two_calls():
        r, c, a = predict(features, t_cur, t_next)
        s = ode.dpm2_intermediate(t_cur, t_next, r)             # s_n, scalar or [B] (Eq. 10)
        s_x, r_x, c_x = per_example(s, x), per_example(r, x), per_example(c, x)
        # first sub-step t_n -> s_n
        if base in MULTISTEP_BASES:
            y, hist = _multistep_substep(base, x, history, d_cur if base == 'ipndm' else x0_hat, t_cur, s)
        else:
            y, hist = ode.euler_update(x, d_cur, s_x - t_cur), history
        x0_mid, evaluated = common.evaluate(denoiser, y, jnp.asarray(a) * s, state)   # a_n scales the model time only
        d_mid = direction(y, x0_mid, s_x)
        # second sub-step s_n -> t_{n+1}, its increment scaled by c_n
        if base is None:
            x_next = ode.euler_update(x, d_mid, c_x * (t_next - t_cur))                 # Eq. 11
        elif base == 'dpm2':
            x_next = ode.dpm2_update(x, d_cur, d_mid, c_x * (t_next - t_cur), r_x)
        elif base == 'euler':
            x_next = ode.euler_update(y, d_mid, c_x * (t_next - s_x))
        else:
            last = jnp.logical_and(lower_order_final, i == (num_intervals or 0) - 1)
            x_next, hist = _multistep_substep(base, y, hist, d_mid if base == 'ipndm' else x0_mid, s, t_next, c,
                                              first_order=last)
        return evaluated._replace(x=x_next, memory=hist)

    # A concrete t_next (jit disabled, or a caller's Python loop) picks the branch in Python; a traced one uses
    # lax.cond, which runs only the taken branch: either way the counted evaluations stay honest.
    if common.is_concrete(t_next):
        return two_calls() if float(t_next) > 0 else into_zero()
    return jax.lax.cond(t_next > 0, two_calls, into_zero)


def interval(denoiser, predict, state, i, t_cur, t_next, *, base=None, afs=False, num_bottleneck=None,
             lower_order_final=False, num_intervals=None):
    """`amed_step` from state = (x, history), for the predictor's training (drivers/amed_train.py, one interval at
    a time): returns (x_next, history)."""
    x, history = state
    state = amed_step(denoiser, common.State(x, history, common.no_evaluations()), i, t_cur, t_next,
                      predict=predict, base=base, afs=afs, num_bottleneck=num_bottleneck,
                      lower_order_final=lower_order_final, num_intervals=num_intervals)
    return state.x, state.memory


def cost(afs=False):
    """2 calls per interval into sigma > 0, 1 into sigma = 0, minus the call AFS saves."""
    return common.Cost(per_step=2, into_zero=1, saved=int(afs))


def _init(*, predict, num_bottleneck=None, base=None, afs=False, max_order=4, lower_order_final=False):
    """init(x_T, sigmas, key) -> (amed_step of this grid, the base's empty history) for common.fixed_grid / solve."""
    def init(x_T, sigmas, key):
        del key  # deterministic
        step = functools.partial(amed_step, predict=predict, base=base, afs=afs, num_bottleneck=num_bottleneck,
                                 lower_order_final=lower_order_final, num_intervals=sigmas.shape[0] - 1)
        return step, init_history(base, x_T, max_order)
    return init


def run(denoiser, x_T, sigmas, *, predict, num_bottleneck=None, base=None, afs=False, max_order=4,
        lower_order_final=False, return_trajectory=False):
    """The whole AMED solve (common.solve, one lax.scan over the grid): (x0, nfe, trajectory or None). Pure in
    predict's parameters."""
    init = _init(predict=predict, num_bottleneck=num_bottleneck, base=base, afs=afs, max_order=max_order,
                 lower_order_final=lower_order_final)
    step, memory = init(x_T, sigmas, None)
    state, trajectory = common.solve(step, denoiser, x_T, sigmas, memory, return_trajectory)
    return state.x, cost(afs).of_grid(sigmas), trajectory


def resolve_lower_order_final(base, lower_order_final):
    """None -> True for the dpmpp_2m base (the authors' setting), False otherwise; True elsewhere is an error."""
    if lower_order_final is None:
        return base == 'dpmpp_2m'
    if lower_order_final and base != 'dpmpp_2m':
        raise ValueError(f'amed: lower_order_final applies to base dpmpp_2m only, got base={base!r}')
    return bool(lower_order_final)


def declared_order(predictor, base, max_order):
    """Global order with predictor=None (r = 1/2, c = a = 1): DPM-Solver-2 (base None, 'dpm2') and DPM-Solver++(2M)
    on the interleaved grid are second order, Euler first; iPNDM's uniform-step weights on the interleaved grid
    t_0, s_0, t_1, ... (never uniform: s_n is the geometric midpoint) leave second order (first for max_order 1).
    A learned predictor (c != 1) has none."""
    if predictor is not None:
        return None
    return {None: 2, 'dpm2': 2, 'dpmpp_2m': 2, 'euler': 1, 'ipndm': min(max_order, 2)}[base]


def amed(*, predictor=None, params=None, base=None, afs=False, max_order=4, lower_order_final=None):
    """AMED-Solver (base=None) or AMED-Plugin on `base` ('euler', 'dpm2', 'ipndm', 'dpmpp_2m').

    predictor: None (r = 1/2, c = a = 1: DPM-Solver-2), (module, params), a module with `params=`, or a callable
    predict(features, t_cur, t_next) -> (r, c, a). afs: analytical first step (saves one call).
    max_order: the iPNDM base's maximal order (1..4). lower_order_final: dpmpp_2m base only, default True (the
    authors'): the last sub-step is first order; False keeps it second order. A trained predictor checkpoint
    carries its own settings: `jaxdiff.drivers.amed_train.load_sampler(path)` builds this sampler and its grid from the
    path alone."""
    if base not in BASES:
        raise ValueError(f'amed: unknown base {base!r}; valid bases: None, ' + ', '.join(BASES[1:]))
    if int(max_order) != max_order or not 1 <= max_order <= 4:
        raise ValueError(f'amed: max_order must be 1..4, got {max_order!r}')
    options = dict(predictor=predictor, params=params, base=base, afs=afs, max_order=max_order,
                   lower_order_final=lower_order_final)
    lower_order_final = resolve_lower_order_final(base, lower_order_final)
    order = declared_order(predictor, base, max_order)
    predict, num_bottleneck = resolve_predictor(predictor, params)

    init = _init(predict=predict, num_bottleneck=num_bottleneck, base=base, afs=afs, max_order=max_order,
                 lower_order_final=lower_order_final)
    return common.fixed_grid(NAME, init, cost=cost(afs), order=order, options=options)
