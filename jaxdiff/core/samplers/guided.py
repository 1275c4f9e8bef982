"""'heun_dg': EDM's Heun with discriminator guidance as the DG authors run it (Kim et al. 2023, EDM-G++): EDM's Heun
step (`ode.heun_step`) with its churn and first evaluation replaced through the step's hooks.

    samplers.get('heun_dg', first_evaluation_only=True, boosting=False, s_churn=0., ...)

Why a sampler and not a denoiser transform: a denoiser D(x, sigma) cannot know which evaluation of a step it is.
Sigma does not tell (the second evaluation of step i and the first of step i + 1 are both at t_{i+1}), so the
step, which knows its own structure, asks a `guidance.GuidedDenoiser` for its pieces (.denoiser and .correction).
With a plain denoiser it is EDM's Heun. Its NFE is Heun's declared cost, and the network and gradient evaluations
are counted from the denoisers' declarations like every sampler's (samplers/common.py).
"""
import math

import jax.numpy as jnp

from jaxdiff.core import guidance, precond
from jaxdiff.core.samplers import common, ode


def heun_dg(*, first_evaluation_only=True, boosting=False, s_churn=0.0, s_min=0.0, s_max=float('inf'), s_noise=1.0,
            boost_churn=4.0, boost_noise=1.0, boost_period=5, boost_weight_period=2):
    """EDM's Heun sampler (Karras et al. 2022, Algorithm 2; `ode.heun_step`) with discriminator guidance as the DG
    authors run it (EDM-G++). Given a GuidedDenoiser g, step i from (x_i, t_i):

        churn as EDM: gamma = min(S / N, sqrt(2) - 1) if s_min <= t_i <= s_max, t_hat = t_i (1 + gamma),
                      x_hat = x_i + t_i sqrt(gamma (2 + gamma)) s_noise z_i      (z_i = common.step_noise(key, i))
        first evaluation, guided:  D_1 = g.denoiser(x_hat, t_hat) + delta(x_hat, t_hat),  d_cur = (x_hat - D_1) / t_hat
        Euler:  x_e = x_hat + (t_{i+1} - t_hat) d_cur
        second evaluation (t_{i+1} > 0): D_2 = g.denoiser(x_e, t_{i+1})  (g(x_e, t_{i+1}) when not
                      first_evaluation_only), x_{i+1} = x_hat + (t_{i+1} - t_hat) (d_cur + d_next) / 2.

    Boosting (their conditional recipe): at steps i % boost_period == 0 the examples whose last log r was < 0 get
    churn boost_churn and noise boost_noise instead of s_churn / s_noise; at steps i % boost_weight_period == 0
    their guidance term is doubled. The last log r [B] is the step's memory (+inf before the first guided call and
    outside the window). With a plain denoiser (no guidance) this is `samplers.get('heun')`.
    NFE = 2 N - 1 on a grid ending at 0, as EDM's Heun."""
    if s_churn < 0 or s_noise < 0 or boost_churn < 0 or boost_noise < 0:
        raise ValueError('heun_dg: s_churn, s_noise, boost_churn and boost_noise must be >= 0')
    if boost_period < 1 or boost_weight_period < 1:
        raise ValueError(f'heun_dg: boost_period={boost_period} and boost_weight_period={boost_weight_period} '
                         'must be >= 1')
    options = dict(first_evaluation_only=first_evaluation_only, boosting=boosting, s_churn=s_churn, s_min=s_min,
                   s_max=s_max, s_noise=s_noise, boost_churn=boost_churn, boost_noise=boost_noise,
                   boost_period=boost_period, boost_weight_period=boost_weight_period)
    stochastic = s_churn > 0 or boosting

    def init(x_T, sigmas, key):
        if stochastic:
            common.require_key('heun_dg', key, 'churn' if s_churn > 0 else 'boosting')
        num_steps = sigmas.shape[0] - 1

        def churn(state, i, t):
            """EDM's churn with per-example gamma and noise (boosted examples get boost_churn / boost_noise)."""
            x, log_ratio = state.x, state.memory
            if not stochastic:
                return x, jnp.broadcast_to(t, x.shape[:1])
            boost = jnp.zeros(x.shape[:1], bool)
            if boosting:
                boost = (i % boost_period == 0) & (log_ratio < 0)
            gamma = jnp.minimum(jnp.where(boost, boost_churn, s_churn) / num_steps, math.sqrt(2) - 1)
            gamma = jnp.where((t >= s_min) & (t <= s_max), gamma, 0.0).astype(x.dtype)
            noise = jnp.where(boost, boost_noise, s_noise).astype(x.dtype)
            return ode.edm_churn(x, t, gamma, noise, common.step_noise(key, i, x.shape, x.dtype))

        def step(denoiser, state, i, t, t_next):
            guided = denoiser if isinstance(denoiser, guidance.GuidedDenoiser) else None
            if boosting and guided is None:
                raise ValueError('heun_dg: boosting needs a guidance.discriminator_guided denoiser')
            if guided is None or guided.is_off:
                unguided = denoiser if guided is None else guided.denoiser
                return ode.heun_step(unguided, state, i, t, t_next, churn=churn)

            def first(denoiser, x_hat, t_hat, i, state):
                """D_1 = g.denoiser + delta (doubled for boosted examples): one evaluation of g, made in its pieces
                because boosting reads the log ratio; the log ratio becomes the memory."""
                x0_hat = guided.denoiser(x_hat, t_hat)
                delta, log_ratio = guided.correction(x_hat, t_hat)
                if boosting:
                    doubled = (i % boost_weight_period == 0) & (log_ratio < 0)
                    delta = jnp.where(precond.per_example(doubled, x_hat), 2 * delta, delta)
                state = common.tally(state, guided, x_hat, t_hat)
                return x0_hat + delta, state._replace(memory=log_ratio)

            second = guided.denoiser if first_evaluation_only else guided
            return ode.heun_step(guided, state, i, t, t_next, churn=churn, first=first, second=second)

        return step, jnp.full(x_T.shape[:1], jnp.inf, x_T.dtype)

    return common.fixed_grid('heun_dg', init, cost=common.Cost(per_step=2), order=None if stochastic else 2,
                             options=options)
