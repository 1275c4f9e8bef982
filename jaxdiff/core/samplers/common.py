"""Conventions every sampler shares, and the one driver of the fixed-grid solvers.

Denoiser interface (SPEC.md): a denoiser is a pure function `D(x, sigma) -> x0_hat`. It may carry two attributes:
  with_aux(x, sigma) -> (x0_hat, aux)           internal activations as a dict (e.g. the UNet's bottleneck,
                                                {'bottleneck': [B, 8, 8, C]}, that a learned step reads);
                                                `call_with_aux`
  evaluations(x, sigma) -> (network, gradient)  int32 scalars: what one call costs (a transform that takes the
                                                gradient of a network declares it, one that runs the model twice
                                                two network evaluations); a denoiser without it costs (1, 0);
                                                `declared_evaluations`

Fixed-grid solvers are written as steps with explicit state (as diffrax's solvers are): a solver's
`init(x_T, sigmas, key) -> (step, memory)` gives the step of one run, `step(denoiser, state, i, t, t_next) -> state`,
and the memory it starts from (a multistep history, a log ratio, or ()). `fixed_grid` makes the Sampler: ONE lax.scan
(`solve`) runs the step over the grid, then the optional denoise_to_zero call, and `finish` builds info. Every
denoiser call inside a step goes through `evaluate` (or `evaluate_first`, `evaluate_with_aux`), which adds the call's
declared evaluations to the counters carried in the state: counting is part of the computation, so it holds inside
lax.cond branches (only the taken branch counts), scan, jit, vmap and pmap, with no host callbacks.

info of every sampler: 'nfe' (the declared `Cost.of_grid`: a Python int on a concrete grid), 'network_evaluations'
and 'gradient_evaluations' (counted, int32, per batched call, i.e. per sample) and, when asked, 'trajectory'.
"""
import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.core import precond


# --- evaluations: what a denoiser call costs, and counting it -----------------------------------------------

class Evaluations(NamedTuple):
    """Network and gradient evaluations (int32 scalars), per batched call: one call evaluates every example once."""
    network: jax.Array
    gradient: jax.Array

    def plus(self, other):
        return Evaluations(self.network + other.network, self.gradient + other.gradient)


def no_evaluations():
    return Evaluations(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def declared_evaluations(denoiser, x, sigma):
    """What one call D(x, sigma) costs: the denoiser's own `evaluations(x, sigma)`, or (1, 0) for a plain one."""
    declare = getattr(denoiser, 'evaluations', None)
    network, gradient = (1, 0) if declare is None else declare(x, sigma)
    return Evaluations(jnp.asarray(network, jnp.int32), jnp.asarray(gradient, jnp.int32))


def call_with_aux(denoiser, x, sigma):
    """(x0_hat, aux) of one call: the denoiser's `with_aux`, or aux = {} for a plain denoiser. sigma: scalar or [B]."""
    if hasattr(denoiser, 'with_aux'):
        return denoiser.with_aux(x, sigma)
    return denoiser(x, sigma), {}


class State(NamedTuple):
    """What a fixed-grid solver carries from grid point to grid point."""
    x: jax.Array                 # the sample at the current grid point
    memory: Any                  # the solver's own state: a multistep history, a log ratio, or ()
    evaluations: Evaluations     # counted so far in this run


def tally(state, denoiser, x, sigma):
    """`state` with one call D(x, sigma)'s declared evaluations added: for a call that a step makes in its pieces
    (samplers/guided.py); every other call uses `evaluate`."""
    return state._replace(evaluations=state.evaluations.plus(declared_evaluations(denoiser, x, sigma)))


def evaluate(denoiser, x, sigma, state):
    """(x0_hat, state): x0_hat = D(x, sigma), its declared evaluations added to the state's counters."""
    return denoiser(x, sigma), tally(state, denoiser, x, sigma)


def evaluate_with_aux(denoiser, x, sigma, state):
    """(x0_hat, aux, state): `evaluate` through the aux convention (`call_with_aux`)."""
    x0_hat, aux = call_with_aux(denoiser, x, sigma)
    return x0_hat, aux, tally(state, denoiser, x, sigma)


def afs_direction(x, sigma):
    """Analytical first step (AFS; Zhou, Chen, Wang, Chen 2024, Sec. 3.3): at sigma_max the data is negligible against
    the noise, so d = (x - D) / sigma is replaced by d = x / sqrt(1 + sigma^2) without calling the denoiser."""
    return x / jnp.sqrt(1 + sigma ** 2)


def evaluate_first(denoiser, x, sigma, i, state, afs=False):
    """`evaluate` at the start of grid step i; with `afs`, at i == 0 the AFS estimate x - sigma afs_direction(x, sigma)
    replaces the call (lax.cond: only the taken branch runs and counts, so the call really is saved)."""
    if not afs:
        return evaluate(denoiser, x, sigma, state)
    return jax.lax.cond(i == 0, lambda: (x - sigma * afs_direction(x, sigma), state),
                        lambda: evaluate(denoiser, x, sigma, state))


def per_example(v, x):
    """A sigma-like value v shaped to broadcast against x [B, ...]: per example ([B]) as precond.per_example
    ([B, 1, ..., 1]), a scalar as it is, so that steps on a shared sigma keep XLA's scalar arithmetic (and the
    samplers their numbers, bit for bit)."""
    v = jnp.asarray(v)
    return v if v.ndim == 0 else precond.per_example(v, x)


def is_concrete(*arrays):
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def validate_sigmas(sigmas, min_len=2):
    """Checks a sigma grid: 1-D, at least `min_len` points, strictly decreasing, non-negative, finite.

    Only concrete grids can be checked (inside a user's jit the grid is a tracer and is trusted).
    """
    sigmas = jnp.asarray(sigmas)
    if sigmas.ndim != 1 or sigmas.shape[0] < min_len:
        raise ValueError(f'sigmas must be a 1-D grid with at least {min_len} points, got shape {sigmas.shape}')
    if is_concrete(sigmas):
        s = np.asarray(sigmas, np.float64)
        if not np.all(np.isfinite(s)) or np.any(s < 0):
            raise ValueError(f'sigmas must be finite and non-negative, got {s}')
        if np.any(np.diff(s) >= 0):
            raise ValueError(f'sigmas must be strictly decreasing (sigmas[0] > ... > sigmas[-1]), got {s}')
    return sigmas


def step_noise(key, i, shape, dtype=jnp.float32):
    """The Gaussian noise z of step i: N(0, I) from fold_in(key, i). Every stochastic sampler draws its
    per-step noise exactly this way, so samplers that reduce to one another agree sample for sample."""
    return jax.random.normal(jax.random.fold_in(key, i), shape, dtype)


def check_finite(x, name):
    """Raises ValueError when a concrete sampler output holds NaN/Inf (e.g. a denoiser that returned NaN)."""
    if is_concrete(x) and not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(f'sampler {name!r} produced NaN/Inf: the denoiser returned non-finite values '
                         f'(check the model parameters and the sigma grid)')
    return x


# --- inputs, costs and the Sampler ---------------------------------------------------------------------------

def prepare(name, x_T, sigmas, min_len=2):
    """Checks the start sample and the grid; returns (x_T, sigmas) with sigmas cast to x_T's float dtype."""
    x_T = jnp.asarray(x_T)
    if x_T.ndim < 1 or not jnp.issubdtype(x_T.dtype, jnp.floating):
        raise ValueError(f'sampler {name!r}: x_T must be a floating array [B, ...], got {x_T.dtype} {x_T.shape}')
    return x_T, validate_sigmas(sigmas, min_len).astype(x_T.dtype)


def require_key(name, key, why):
    if key is None:
        raise ValueError(f'sampler {name!r} draws noise ({why}): pass key=jax.random.key(...)')
    return key


@dataclasses.dataclass(frozen=True)
class Cost:
    """Denoiser calls per sample of a fixed-grid sampler, as the sampler declares them.

    per_step   calls of a step into sigma_next > 0
    into_zero  calls of the step into sigma_next = 0 (first order in every sampler here: one call)
    saved      calls saved at the start (AFS replaces the first call: 1)
    final      calls after the last grid point on a grid ending above 0 (denoise_to_zero: 1)
    """
    per_step: int
    into_zero: int = 1
    saved: int = 0
    final: int = 0

    def nfe(self, num_points, ends_at_zero=True):
        """Calls on a grid of `num_points` entries (len(sigmas); with the appended 0 when `ends_at_zero`)."""
        if int(num_points) != num_points or num_points < 2:
            raise ValueError(f'a grid has at least 2 points (len(sigmas)), got {num_points!r}')
        steps = int(num_points) - 1
        if ends_at_zero:
            if self.final:
                raise ValueError('denoise_to_zero needs a grid ending above 0 (ends_at_zero=False)')
            return (steps - 1) * self.per_step + self.into_zero - self.saved
        return steps * self.per_step - self.saved + self.final

    def of_grid(self, sigmas):
        """Calls on the grid `sigmas`: a Python int when it is concrete, a traced int32 inside a user's jit."""
        t_next = sigmas[1:]
        steps = t_next.shape[0]
        if is_concrete(t_next):
            positive = int(np.sum(np.asarray(t_next) > 0))
            final = self.final if float(t_next[-1]) > 0 else 0
        else:
            positive = jnp.sum(t_next > 0).astype(jnp.int32)
            final = self.final * (t_next[-1] > 0).astype(jnp.int32)
        return positive * self.per_step + (steps - positive) * self.into_zero - self.saved + final

    def num_points_for(self, nfe, ends_at_zero=True):
        """The grid length (len(sigmas)) at which the sampler spends exactly `nfe` calls, or None."""
        num_points = 2
        while self.nfe(num_points, ends_at_zero) < nfe:
            num_points += 1
        return num_points if self.nfe(num_points, ends_at_zero) == nfe else None


class Sampler:
    """A sampler with its declared cost and order (as diffrax solvers declare theirs):

        x0, info = sampler(denoiser, x_T, sigmas, key=None, return_trajectory=False)
        sampler.nfe(num_points, ends_at_zero=True)        # denoiser calls per sample on a grid of that length
        sampler.num_points_for(nfe, ends_at_zero=True)    # the grid length (len(sigmas)) that spends `nfe` calls
        sampler.order                                     # global order of the deterministic solve, or None

    `info['nfe']` of a run is `cost.of_grid(sigmas)`, the same declaration; tests count the calls. `order` is that of
    the update from full history on a smooth ODE (warm-start steps of multistep methods and the first-order step
    into sigma = 0 not counted; at most 1 with AFS); None where it does not apply (stochastic samplers, learned
    steps).
    A sampler that chooses its own steps (adaptive) has cost None: its NFE is known only from info['nfe'].
    """

    def __init__(self, name, run, *, cost, order, options):
        if order is not None and options.get('afs'):
            # AFS replaces the first direction by x / sqrt(1 + sigma^2), off by O(|D| / sigma) over a whole step:
            # a first-order error term, whatever the order of the other steps
            order = min(order, 1)
        self.name, self._run, self.cost, self.order, self.options = name, run, cost, order, dict(options)

    def __call__(self, denoiser, x_T, sigmas, key=None, return_trajectory=False):
        return self._run(denoiser, x_T, sigmas, key=key, return_trajectory=return_trajectory)

    def __repr__(self):
        def show(value):   # a learned model or weight array by its type only: error messages stay one line
            return repr(value) if value is None or isinstance(value, (bool, int, float, str)) else type(value).__name__
        options = ', '.join(f'{k}={show(v)}' for k, v in self.options.items())
        return f"samplers.get({self.name!r}{', ' if options else ''}{options})"

    def _declared(self):
        if self.cost is None:
            raise ValueError(f'sampler {self.name!r} chooses its own steps: its NFE is known only after the solve '
                             f"(info['nfe'])")
        return self.cost

    def nfe(self, num_points, ends_at_zero=True):
        try:
            return self._declared().nfe(num_points, ends_at_zero)
        except ValueError as e:
            raise ValueError(f'{self!r}: {e}') from None

    def num_points_for(self, nfe, ends_at_zero=True):
        """len(sigmas) of the grid on which this sampler spends exactly `nfe` calls; ValueError naming the
        reachable neighbours when no grid does."""
        cost = self._declared()
        if int(nfe) != nfe or nfe < 1:
            raise ValueError(f'{self!r}: NFE must be a positive integer, got {nfe!r}')
        self.nfe(2, ends_at_zero)                             # a grid this sampler cannot run is the error
        num_points = cost.num_points_for(int(nfe), ends_at_zero)
        if num_points is None:
            reachable = sorted({self.nfe(n, ends_at_zero) for n in range(2, int(nfe) + 3)})
            below = [n for n in reachable if n < nfe][-1:]
            above = [n for n in reachable if n > nfe][:1]
            raise ValueError(f'{self!r} spends {self._formula(ends_at_zero)} calls on N grid points: no grid gives '
                             f'NFE {nfe} (nearest: {", ".join(map(str, below + above))})')
        return num_points

    def _formula(self, ends_at_zero):
        cost = self.cost
        if ends_at_zero:
            text = f'{cost.per_step} (N - 2) + {cost.into_zero}'
        else:
            text = f'{cost.per_step} (N - 1)' + (f' + {cost.final}' if cost.final else '')
        return text + (f' - {cost.saved}' if cost.saved else '')


# --- the driver of every fixed-grid solver ------------------------------------------------------------------

def solve(step, denoiser, x_T, sigmas, memory=(), return_trajectory=False):
    """Runs `state = step(denoiser, state, i, t, t_next)` for every grid step i in one lax.scan, from x_T and `memory`
    with no evaluations counted. Returns the final State and, when `return_trajectory`, x at every grid point
    [len(sigmas), B, ...] (x_T first), else None."""
    def body(state, inputs):
        i, t, t_next = inputs
        state = step(denoiser, state, i, t, t_next)
        return state, (state.x if return_trajectory else None)

    steps = (jnp.arange(sigmas.shape[0] - 1), sigmas[:-1], sigmas[1:])
    state, xs = jax.lax.scan(body, State(x_T, memory, no_evaluations()), steps)
    trajectory = jnp.concatenate([x_T[None], xs], axis=0) if return_trajectory else None
    return state, trajectory


def denoise_to_zero(name, denoiser, state, sigmas):
    """The final jump x0 = D(x, sigmas[-1]) on a grid ending above 0 (`denoise_to_zero`, as in the score_sde /
    k-diffusion samplers; Cost.final declares it). On a grid that already ends at 0 it is a ValueError; on a traced
    grid the call runs (and counts) only when sigmas[-1] > 0."""
    sigma_last = sigmas[-1]

    def jump():
        x0, counted = evaluate(denoiser, state.x, sigma_last, state)
        return counted._replace(x=x0)

    if is_concrete(sigma_last):
        if not float(sigma_last) > 0:
            raise ValueError(f'sampler {name!r}: denoise_to_zero needs a grid ending above 0; this grid already '
                             f'ends at sigma=0 (its last step is the jump to 0)')
        return jump()
    return jax.lax.cond(sigma_last > 0, jump, lambda: state)


def finish(name, state, nfe, trajectory):
    """The (x0, info) pair every sampler returns: nfe (its Cost.of_grid), the counted evaluations of `state` and the
    trajectory when there is one; ValueError on a concrete non-finite x0."""
    check_finite(state.x, name)
    info = {'nfe': nfe, 'network_evaluations': state.evaluations.network,
            'gradient_evaluations': state.evaluations.gradient}
    if trajectory is not None:
        info['trajectory'] = trajectory
    return state.x, info


def fixed_grid(name, init, *, cost, order, options):
    """The Sampler of a fixed-grid solver. `init(x_T, sigmas, key) -> (step, memory)` checks what the run needs
    (a key, the data's shape) and gives its step, the run's constants closed over; `solve` drives it, Cost.final
    (the denoise_to_zero option) adds the final call, and info['nfe'] is `cost.of_grid(sigmas)`."""
    def run(denoiser, x_T, sigmas, key=None, return_trajectory=False):
        x_T, sigmas = prepare(name, x_T, sigmas)
        step, memory = init(x_T, sigmas, key)
        state, trajectory = solve(step, denoiser, x_T, sigmas, memory, return_trajectory)
        if cost.final:
            state = denoise_to_zero(name, denoiser, state, sigmas)
        return finish(name, state, cost.of_grid(sigmas), trajectory)

    return Sampler(name, run, cost=cost, order=order, options=options)
