"""Adaptive Runge-Kutta solve of the PF-ODE with error control (diffrax Tsit5 / Dopri5 + PID step-size controller).

The ODE is integrated in u = log sigma, where it reads dx/du = sigma dx/dsigma = x - D(x, e^u) (smooth on the whole
interval, no 1/sigma blow-up). The grid only says where to start and stop and where to record the trajectory; the
solver chooses its own steps. A grid ending at 0 is solved to sigmas[-2], then the usual first-order step into 0,
x0 = D(x, sigmas[-2]). Run in float64 with tight tolerances it is the reference solve (`analytic.reference_solve`).

NFE: Tsit5 and Dopri5 are FSAL (first stage = last stage of the previous step), so each attempted step, accepted or
rejected, costs 6 new calls, plus 1 call at the start (diffrax 0.7 shares it between the first stage and its
initial step-size guess; counted with a callback for Tsit5 and Dopri5 at three tolerances). info['nfe'] =
6 * num_steps + 1 (+1 for the step into 0); tests/test_samplers.py counts the calls. info['network_evaluations'] and
info['gradient_evaluations'] are (nfe, 0) for a plain denoiser; for a denoiser that declares its `evaluations`
(a guidance transform) they are absent: the solver's evaluation points lie inside diffrax's loop, where a declared
cost cannot be counted without host callbacks.
"""
import diffrax
import jax.numpy as jnp
import numpy as np

from jaxdiff.core.samplers import common

_SOLVERS = {'tsit5': diffrax.Tsit5, 'dopri5': diffrax.Dopri5}
_ORDERS = {'tsit5': 5, 'dopri5': 5}             # order of the propagated solution (Tsitouras 2011; Dormand-Prince)
_CALLS_PER_STEP, _CALLS_AT_START = 6, 1


def solve_log_sigma(denoiser, x_T, sigma_start, sigma_end, *, solver='tsit5', rtol=1e-5, atol=1e-5, max_steps=4096,
                    save_sigmas=None):
    """Integrates dx/du = x - D(x, e^u) from u = log sigma_start down to log sigma_end (both > 0).

    Returns (x at sigma_end, denoiser calls per sample as an int32 scalar, states at `save_sigmas` or None)."""
    if solver not in _SOLVERS:
        raise ValueError(f'unknown adaptive solver {solver!r}; valid: {", ".join(sorted(_SOLVERS))}')
    x_T = jnp.asarray(x_T)
    dtype = x_T.dtype
    term = diffrax.ODETerm(lambda u, x, args: x - denoiser(x, jnp.exp(u).astype(dtype)))
    u_start = jnp.log(jnp.asarray(sigma_start, dtype))
    u_end = jnp.log(jnp.asarray(sigma_end, dtype))
    saveat = diffrax.SaveAt(t1=True) if save_sigmas is None else diffrax.SaveAt(ts=jnp.log(save_sigmas))
    solution = diffrax.diffeqsolve(term, _SOLVERS[solver](), t0=u_start, t1=u_end, dt0=None, y0=x_T,
                                   stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
                                   saveat=saveat, max_steps=max_steps)
    nfe = _CALLS_PER_STEP * solution.stats['num_steps'] + _CALLS_AT_START
    return solution.ys[-1], nfe, (None if save_sigmas is None else solution.ys)


def adaptive(*, solver='tsit5', rtol=1e-5, atol=1e-5, max_steps=4096, denoise_to_zero=False):
    """Adaptive diffrax solve from sigmas[0] to the end of the grid (see module docstring). No AFS: the first call of
    an adaptive solver also sizes its first step, so there is no first step to save."""
    if solver not in _SOLVERS:
        raise ValueError(f'adaptive: unknown solver {solver!r}; valid: {", ".join(sorted(_SOLVERS))}')
    if not (rtol > 0 and atol > 0):
        raise ValueError(f'adaptive: rtol and atol must be positive, got rtol={rtol!r}, atol={atol!r}')

    def sampler(denoiser, x_T, sigmas, key=None, return_trajectory=False):
        del key
        if not common.is_concrete(sigmas):
            raise ValueError('sampler \'adaptive\' needs a concrete sigma grid (pass it as a static value, not '
                             'through jit arguments): whether it ends at 0 decides the solve interval')
        ends_at_zero = float(np.asarray(sigmas)[-1]) == 0.0   # read before any jnp op (under jit those trace)
        x_T, sigmas = common.prepare('adaptive', x_T, sigmas)
        positive = sigmas[:-1] if ends_at_zero else sigmas
        if positive.shape[0] < 2:
            raise ValueError('sampler \'adaptive\' needs at least two positive grid points (start and end)')
        x, nfe, states = solve_log_sigma(denoiser, x_T, positive[0], positive[-1], solver=solver, rtol=rtol,
                                         atol=atol, max_steps=max_steps,
                                         save_sigmas=positive[1:] if return_trajectory else None)
        trajectory = None
        if return_trajectory:
            trajectory = jnp.concatenate([x_T[None], states], axis=0)
        # diffrax counts its calls (nfe); the calls after the solve go through common.evaluate like every step's
        state = common.State(x, (), common.Evaluations(jnp.asarray(nfe, jnp.int32), jnp.zeros((), jnp.int32)))
        if ends_at_zero:
            x0_hat, state = common.evaluate(denoiser, x, positive[-1], state)
            state = state._replace(x=x0_hat)
            nfe = nfe + 1
            if return_trajectory:
                trajectory = jnp.concatenate([trajectory, x0_hat[None]], axis=0)
        if denoise_to_zero:
            state = common.denoise_to_zero('adaptive', denoiser, state, sigmas)
        x0, info = common.finish('adaptive', state, nfe + int(denoise_to_zero), trajectory)
        if hasattr(denoiser, 'evaluations'):
            # the solver's own calls are at points it chooses inside its loop: their declared costs cannot be
            # counted without host callbacks, so a declaring denoiser gets no counted evaluations here
            del info['network_evaluations'], info['gradient_evaluations']
        return x0, info

    # cost None: the solver chooses its steps, so its NFE is known only from info['nfe'] (common.Sampler)
    return common.Sampler('adaptive', sampler, cost=None, order=_ORDERS[solver],
                          options=dict(solver=solver, rtol=rtol, atol=atol, max_steps=max_steps,
                                       denoise_to_zero=denoise_to_zero))
