"""Conventions every sampler shares: the denoiser call (with optional aux), grid checks, per-step noise, output checks.

Denoiser interface: a denoiser is a pure function `D(x, sigma) -> x0_hat`. A denoiser that can also expose
internal activations (the UNet bottleneck that AMED's predictor reads) additionally carries an attribute
`with_aux(x, sigma) -> (x0_hat, aux)` where `aux` is a dict (e.g. {'bottleneck': [B, 8, 8, C]}).
`call_denoiser` is the one place that knows this.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def call_denoiser(denoiser, x, sigma, with_aux=False):
    """Returns x0_hat (and aux, {} for a plain denoiser, when `with_aux`). sigma: scalar or [B]."""
    if not with_aux:
        return denoiser(x, sigma)
    if hasattr(denoiser, 'with_aux'):
        return denoiser.with_aux(x, sigma)
    return denoiser(x, sigma), {}


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


# --- shared pieces of the fixed-grid solvers (one lax.scan over the grid; see ode.py, multistep.py, ddim.py) ---

def prepare(name, x_T, sigmas, min_len=2):
    """Checks the start sample and the grid; returns (x_T, sigmas) with sigmas cast to x_T's float dtype."""
    x_T = jnp.asarray(x_T)
    if x_T.ndim < 1 or not jnp.issubdtype(x_T.dtype, jnp.floating):
        raise ValueError(f'sampler {name!r}: x_T must be a floating array [B, ...], got {x_T.dtype} {x_T.shape}')
    return x_T, validate_sigmas(sigmas, min_len).astype(x_T.dtype)


def require_key(name, key, why):
    if key is None:
        raise ValueError(f'sampler {name!r} draws noise ({why}): pass key=jax.random.PRNGKey(...)')
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
    into sigma = 0 not counted; at most 1 with AFS); None where it does not apply (stochastic samplers, a learned
    AMED predictor).
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
        def show(value):   # a predictor or weight array by its type only: error messages stay one line
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


def afs_direction(x, sigma):
    """Analytical first step (AFS; Zhou et al. 2024, AMED-Solver): at sigma_max the data is negligible against
    the noise, so d = (x - D) / sigma is replaced by d = x / sqrt(1 + sigma^2) without calling the denoiser."""
    return x / jnp.sqrt(1 + sigma ** 2)


def denoise(denoiser, x, sigma, i=None, afs=False):
    """x0_hat = D(x, sigma); with `afs`, at grid index i == 0 the AFS estimate x - sigma * afs_direction(x, sigma)
    replaces the call (lax.cond: only the taken branch runs, so the call really is saved)."""
    if not afs:
        return denoiser(x, sigma)
    return jax.lax.cond(i == 0, lambda: x - sigma * afs_direction(x, sigma), lambda: denoiser(x, sigma))


def scan_grid(step, carry, sigmas, x_of, return_trajectory):
    """Runs `carry = step(carry, i, t, t_next)` for every grid step i in one lax.scan.

    Returns the final carry and, when `return_trajectory`, x at every grid point [len(sigmas), B, ...] (x_T first),
    `x_of(carry)` picking x out of the carry."""
    x_T = x_of(carry)

    def body(carry, inputs):
        i, t, t_next = inputs
        carry = step(carry, i, t, t_next)
        return carry, (x_of(carry) if return_trajectory else None)

    steps = (jnp.arange(sigmas.shape[0] - 1), sigmas[:-1], sigmas[1:])
    carry, xs = jax.lax.scan(body, carry, steps)
    trajectory = jnp.concatenate([x_T[None], xs], axis=0) if return_trajectory else None
    return carry, trajectory


def denoise_to_zero_step(name, denoiser, x, sigmas, enabled):
    """Optional final jump x0 = D(x, sigmas[-1]) for grids ending above 0 (`denoise_to_zero`, as in the score_sde /
    k-diffusion samplers; Cost.final counts it). On a grid that already ends at 0 it is a ValueError."""
    if not enabled:
        return x
    sigma_last = sigmas[-1]
    if is_concrete(sigma_last):
        if not float(sigma_last) > 0:
            raise ValueError(f'sampler {name!r}: denoise_to_zero needs a grid ending above 0; this grid already '
                             f'ends at sigma=0 (its last step is the jump to 0)')
        return denoiser(x, sigma_last)
    return jax.lax.cond(sigma_last > 0, lambda: denoiser(x, sigma_last), lambda: x)


def finish(name, x0, nfe, trajectory):
    """The (x0, info) pair every sampler returns (nfe: its Cost.of_grid); ValueError on a concrete non-finite x0."""
    check_finite(x0, name)
    info = {'nfe': nfe}
    if trajectory is not None:
        info['trajectory'] = trajectory
    return x0, info
