"""Discriminator guidance as a denoiser -> denoiser transform, and the authors' guided Heun sampler (EDM-G++).

Kim, Kim, Kwon, Kang, Moon, "Refining Generative Process with Discriminator Guidance in Score-based Diffusion
Models" (ICML 2023). Theorem 1: with d*(x, sigma) the optimal discriminator between perturbed data (label 1) and
perturbed model samples (label 0), grad log p_data = grad log p_model + grad log r, log r = log(d* / (1 - d*)).
With Tweedie's D = x + sigma^2 grad log p (EDM eq. 3) the guided model is the denoiser

    D_guided(x, sigma) = D(x, sigma) + w sigma^2 grad_x log r(x, sigma)          (SPEC.md)

and the PF-ODE slope (x - D_guided) / sigma = (x - D) / sigma - w sigma grad_x log r is their corrected d_cur.
Any sampler runs on D_guided. The authors guide only inside a time window (VP time tau >= 0.01, i.e.
sigma >= precond.vp_sigma_of_t(0.01) ~ 0.0447) and, in EDM's Heun, only the first evaluation of each step (their
second-order weight is 0 by default), with w = 2 unconditional, w = 1 plus "boosting" conditional.

Public API:
    discriminator_guided(denoiser, logit_fn, weight=2.0, sigma_min=0.0, sigma_max=inf) -> GuidedDenoiser
        logit_fn(x, sigma [B]) -> [B] log r; per-example independent (no batch statistics), so the gradient of the
        batch sum is each example's own gradient. The GuidedDenoiser is a plain D(x, sigma) for every sampler and
        also carries .correction(x, sigma), .denoiser (the unguided one) and with_aux (passed through).
    guided_heun(first_evaluation_only=True, boosting=False, s_churn=0., ...) -> sampler
        EDM's Heun (Algorithm 2) that knows a GuidedDenoiser: guides the first evaluation of each step only (the
        authors' choice) and optionally boosts; info['guidance_calls'] beside info['nfe'].
    count_guidance_calls(sampler, guided, x_T, sigmas, key=None) -> (x0, info) with info['guidance_calls']
        for any sampler: counts the discriminator-gradient evaluations the run really made.
    window_calls(sampler, sample_shape, sigmas, sigma_min, sigma_max, key=None) -> int
        the discriminator-gradient evaluations per batch of a sampler whose evaluation points do not depend on x
        (every fixed-grid sampler), counted on a one-example probe: what a sampler reports beside its NFE.
    clipped_log_ratio(logit, eps=1e-5): log r of d clipped to [eps, 1 - eps], as the authors compute it.

Why a Heun-specific sampler and not a wrapper: a denoiser D(x, sigma) cannot know which evaluation of a step it
is. Sigma does not tell (the second evaluation of step i and the first of step i + 1 are both at t_{i+1}), and a
call counter is Python state that runs once at trace time inside lax.scan, not once per call. So the sampler, which
knows its own structure, asks the GuidedDenoiser for the pieces (.denoiser and .correction).

A guidance call is one batched evaluation of grad_x logit_fn; it is skipped (lax.cond) when no example of the
batch lies in [sigma_min, sigma_max], and counted the same way.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.core import precond
from jaxdiff.core.samplers import common


def clipped_log_ratio(logit, eps=1e-5):
    """log(d / (1 - d)) with d = sigmoid(logit) clipped to [eps, 1 - eps] (the authors' `get_log_ratio`): the logit
    clipped to +-log((1 - eps) / eps), so a saturated discriminator gives no gradient."""
    bound = math.log((1 - eps) / eps)
    return jnp.clip(logit, -bound, bound)


class GuidedDenoiser:
    """D_guided(x, sigma) = D(x, sigma) + weight sigma^2 grad_x logit_fn(x, sigma) for sigma in [sigma_min,
    sigma_max] (per example), D(x, sigma) elsewhere. Build it with `discriminator_guided`."""

    def __init__(self, denoiser, logit_fn, weight, sigma_min, sigma_max, on_gradient=None):
        self.denoiser, self.logit_fn = denoiser, logit_fn
        self.weight, self.sigma_min, self.sigma_max = weight, sigma_min, sigma_max
        self._on_gradient = on_gradient          # a host callback per gradient evaluation (count_guidance_calls)

    @property
    def is_off(self):
        """weight == 0 as a Python number: the guidance is skipped entirely and D_guided is D exactly."""
        return isinstance(self.weight, (int, float)) and self.weight == 0

    def active(self, x, sigma):
        """[B] bool: which examples lie inside the guidance window."""
        sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])
        return (sigma >= self.sigma_min) & (sigma <= self.sigma_max)

    def correction(self, x, sigma):
        """(delta, log_ratio): delta = weight sigma^2 grad_x log r inside the window, 0 outside; log_ratio [B] =
        logit_fn(x, sigma) inside, +inf outside (so boosting never picks an unguided example)."""
        sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])
        active = self.active(x, sigma)
        unguided = (jnp.zeros_like(x), jnp.full(x.shape[:1], jnp.inf, x.dtype))
        if self.is_off:
            return unguided

        def guided():
            if self._on_gradient is not None:
                jax.debug.callback(self._on_gradient)
            batch_sum = lambda x: (lambda l: (jnp.sum(l), l))(self.logit_fn(x, sigma).astype(x.dtype))
            (_, log_ratio), grad = jax.value_and_grad(batch_sum, has_aux=True)(x)
            delta = self.weight * precond.per_example(sigma, x, x.dtype) ** 2 * grad
            mask = precond.per_example(active, x, x.dtype)
            return jnp.where(mask, delta, 0).astype(x.dtype), jnp.where(active, log_ratio, jnp.inf)

        return jax.lax.cond(jnp.any(active), guided, lambda: unguided)

    def __call__(self, x, sigma):
        if self.is_off:
            return self.denoiser(x, sigma)
        return self.denoiser(x, sigma) + self.correction(x, sigma)[0]

    def with_aux(self, x, sigma):
        """(D_guided, aux) with the unguided denoiser's aux (samplers/common.py's convention), {} if it has none."""
        x0_hat, aux = common.call_denoiser(self.denoiser, x, sigma, with_aux=True)
        if self.is_off:
            return x0_hat, aux
        return x0_hat + self.correction(x, sigma)[0], aux


def discriminator_guided(denoiser, logit_fn, weight=2.0, sigma_min=0.0, sigma_max=float('inf')):
    """The guided denoiser of SPEC.md (Kim et al. 2023, Theorem 1): D + weight sigma^2 grad_x logit_fn inside
    [sigma_min, sigma_max], D elsewhere. weight = 0 returns D's values exactly (no gradient is computed)."""
    if not sigma_min <= sigma_max:
        raise ValueError(f'guidance: sigma_min={sigma_min} must not exceed sigma_max={sigma_max}')
    return GuidedDenoiser(denoiser, logit_fn, weight, sigma_min, sigma_max)


def _count(guided, x, sigma):
    """1 when this evaluation computes a discriminator gradient (some example in the window), else 0."""
    if guided is None or guided.is_off:
        return jnp.zeros((), jnp.int32)
    return jnp.any(guided.active(x, sigma)).astype(jnp.int32)


def guided_heun(*, first_evaluation_only=True, boosting=False, s_churn=0.0, s_min=0.0, s_max=float('inf'),
                s_noise=1.0, boost_churn=4.0, boost_noise=1.0, boost_period=5, boost_weight_period=2):
    """EDM's Heun sampler (Karras et al. 2022, Algorithm 2) with discriminator guidance as the DG authors run it
    (EDM-G++). Given a GuidedDenoiser g, step i from (x_i, t_i):

        churn as EDM: gamma = min(S / N, sqrt(2) - 1) if s_min <= t_i <= s_max, t_hat = t_i (1 + gamma),
                      x_hat = x_i + t_i sqrt(gamma (2 + gamma)) s_noise z_i      (z_i = common.step_noise(key, i))
        first evaluation, guided:  D_1 = g.denoiser(x_hat, t_hat) + delta(x_hat, t_hat),  d_cur = (x_hat - D_1) / t_hat
        Euler:  x_e = x_hat + (t_{i+1} - t_hat) d_cur
        second evaluation (t_{i+1} > 0): D_2 = g.denoiser(x_e, t_{i+1})  (g(x_e, t_{i+1}) when not
                      first_evaluation_only), x_{i+1} = x_hat + (t_{i+1} - t_hat) (d_cur + d_next) / 2.

    Boosting (their conditional recipe): at steps i % boost_period == 0 the examples whose last log r was < 0 get
    churn boost_churn and noise boost_noise instead of s_churn / s_noise; at steps i % boost_weight_period == 0
    their guidance term is doubled. With a plain denoiser (no guidance) this is `samplers.get('heun')`.
    NFE = 2 N - 1 on a grid ending at 0; info['guidance_calls'] = discriminator-gradient evaluations made.
    """
    if s_churn < 0 or s_noise < 0 or boost_churn < 0 or boost_noise < 0:
        raise ValueError('guided_heun: s_churn, s_noise, boost_churn and boost_noise must be >= 0')
    if boost_period < 1 or boost_weight_period < 1:
        raise ValueError(f'guided_heun: boost_period={boost_period} and boost_weight_period={boost_weight_period} '
                         'must be >= 1')

    def sampler(denoiser, x_T, sigmas, key=None, return_trajectory=False):
        x_T, sigmas = common.prepare('guided_heun', x_T, sigmas)
        guided = denoiser if isinstance(denoiser, GuidedDenoiser) else None
        base = denoiser if guided is None else guided.denoiser
        if boosting and guided is None:
            raise ValueError('guided_heun: boosting needs a guidance.discriminator_guided denoiser')
        churn = s_churn > 0 or boosting
        if churn:
            common.require_key('guided_heun', key, 'churn' if s_churn > 0 else 'boosting')
        num_steps = sigmas.shape[0] - 1
        batch = x_T.shape[0]

        def first_evaluation(x, i, t, log_ratio):
            """(x_hat, t_hat [B], D_1, log_ratio, guidance calls) of step i."""
            t_hat = jnp.broadcast_to(t, (batch,))
            if churn:
                boost = jnp.zeros((batch,), bool)
                if boosting:
                    boost = (i % boost_period == 0) & (log_ratio < 0)
                gamma = jnp.minimum(jnp.where(boost, boost_churn, s_churn) / num_steps, math.sqrt(2) - 1)
                gamma = jnp.where((t >= s_min) & (t <= s_max), gamma, 0.0).astype(x.dtype)
                noise = jnp.where(boost, boost_noise, s_noise).astype(x.dtype)
                z = common.step_noise(key, i, x.shape, x.dtype)
                # sqrt(t_hat^2 - t^2) written as t sqrt(gamma (2 + gamma)), as samplers/ode.py does
                x = x + precond.per_example(t * jnp.sqrt(gamma * (2 + gamma)) * noise, x, x.dtype) * z
                t_hat = t + gamma * t
            x0_hat = base(x, t_hat)
            if guided is None or guided.is_off:
                return x, t_hat, x0_hat, log_ratio, jnp.zeros((), jnp.int32)
            delta, log_ratio = guided.correction(x, t_hat)
            if boosting:
                doubled = (i % boost_weight_period == 0) & (log_ratio < 0)
                delta = jnp.where(precond.per_example(doubled, x), 2 * delta, delta)
            return x, t_hat, x0_hat + delta, log_ratio, _count(guided, x, t_hat)

        second = base if first_evaluation_only or guided is None else guided

        def step(carry, i, t, t_next):
            x, log_ratio, calls = carry
            x_hat, t_hat, x0_hat, log_ratio, first_calls = first_evaluation(x, i, t, log_ratio)
            d_cur = (x_hat - x0_hat) / precond.per_example(t_hat, x, x.dtype)
            x_euler = x_hat + precond.per_example(t_next - t_hat, x, x.dtype) * d_cur

            def correct():
                d_next = (x_euler - second(x_euler, t_next)) / t_next
                second_calls = _count(None if second is base else guided, x_euler, t_next)
                h = precond.per_example(t_next - t_hat, x, x.dtype)
                return x_hat + h * (0.5 * d_cur + 0.5 * d_next), second_calls

            x_next, second_calls = jax.lax.cond(t_next > 0, correct, lambda: (x_euler, jnp.zeros((), jnp.int32)))
            return x_next, log_ratio, calls + first_calls + second_calls

        init = (x_T, jnp.full((batch,), jnp.inf, x_T.dtype), jnp.zeros((), jnp.int32))
        (x, _, calls), trajectory = common.scan_grid(step, init, sigmas, lambda carry: carry[0], return_trajectory)
        t_next = sigmas[1:]
        if common.is_concrete(t_next):
            positive = int(np.sum(np.asarray(t_next) > 0))
        else:
            positive = jnp.sum(t_next > 0).astype(jnp.int32)
        nfe = 2 * positive + (num_steps - positive)       # one call into sigma = 0, two per other step
        x0, info = common.finish('guided_heun', x, nfe, trajectory)
        info['guidance_calls'] = calls
        return x0, info

    return sampler


def count_guidance_calls(sampler, guided, x_T, sigmas, key=None):
    """Runs `sampler(guided, x_T, sigmas, key)` for any sampler and returns (x0, info) with info['guidance_calls']:
    the batched discriminator-gradient evaluations that really ran (a host callback per evaluation, counted after
    jax.effects_barrier). Meant for reports on one process and device: under SPMD sharding every device would run
    the callback."""
    if not isinstance(guided, GuidedDenoiser):
        raise ValueError('count_guidance_calls needs a guidance.discriminator_guided denoiser')
    count = [0]

    def bump():
        count[0] += 1

    counting = GuidedDenoiser(guided.denoiser, guided.logit_fn, guided.weight, guided.sigma_min, guided.sigma_max,
                              on_gradient=bump)
    x0, info = sampler(counting, x_T, sigmas, key=key)
    jax.block_until_ready(x0)
    jax.effects_barrier()
    return x0, dict(info, guidance_calls=count[0])


def window_calls(sampler, sample_shape, sigmas, sigma_min=0.0, sigma_max=float('inf'), key=None):
    """Discriminator-gradient evaluations that `sampler` makes on the grid `sigmas` with guidance inside
    [sigma_min, sigma_max], counted by `count_guidance_calls` on a probe: one example of `sample_shape`, a zero
    denoiser and a zero logit. Exact for every sampler whose evaluation points do not depend on x (the fixed-grid
    ones, churn included), which is all but a sampler that picks its own steps."""
    probe = GuidedDenoiser(lambda x, sigma: jnp.zeros_like(x), lambda x, sigma: jnp.zeros(x.shape[:1], x.dtype),
                           1.0, sigma_min, sigma_max)
    x_T = jnp.zeros((1, *sample_shape), jnp.float32)
    key = jax.random.key(0) if key is None else key
    return count_guidance_calls(sampler, probe, x_T, jnp.asarray(sigmas, jnp.float32), key=key)[1]['guidance_calls']
