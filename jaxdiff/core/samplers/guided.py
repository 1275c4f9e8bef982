"""'heun_dg': EDM's Heun with discriminator guidance as the DG authors run it (Kim et al. 2023, EDM-G++): the first
evaluation of each step guided, optional boosting (`guidance.guided_heun`), registered with its cost and order like
every sampler. With a plain denoiser it is EDM's Heun; with a `guidance.discriminator_guided` denoiser it reads
the guidance's pieces and reports info['guidance_calls'] beside info['nfe'].

    samplers.get('heun_dg', first_evaluation_only=True, boosting=False, s_churn=0., ...)

`reporting_guidance_calls(sampler, calls)` gives any other sampler the same info['guidance_calls'] (a count made
by `guidance.window_calls`).
"""
from jaxdiff.core import guidance
from jaxdiff.core.samplers import common


def heun_dg(*, first_evaluation_only=True, boosting=False, s_churn=0.0, s_min=0.0, s_max=float('inf'), s_noise=1.0,
            boost_churn=4.0, boost_noise=1.0, boost_period=5, boost_weight_period=2):
    """`guidance.guided_heun` (see there); NFE = 2 N - 1 on a grid ending at 0, as EDM's Heun."""
    options = dict(first_evaluation_only=first_evaluation_only, boosting=boosting, s_churn=s_churn, s_min=s_min,
                   s_max=s_max, s_noise=s_noise, boost_churn=boost_churn, boost_noise=boost_noise,
                   boost_period=boost_period, boost_weight_period=boost_weight_period)
    run = guidance.guided_heun(**options)
    stochastic = s_churn > 0 or boosting
    return common.Sampler('heun_dg', run, cost=common.Cost(per_step=2), order=None if stochastic else 2,
                          options=options)


def reporting_guidance_calls(sampler, calls):
    """`sampler` whose info also holds 'guidance_calls' = calls (per batch, as NFE is per sample)."""
    def run(denoiser, x_T, sigmas, key=None, return_trajectory=False):
        x0, info = sampler(denoiser, x_T, sigmas, key=key, return_trajectory=return_trajectory)
        return x0, dict(info, guidance_calls=calls)

    if isinstance(sampler, common.Sampler):
        return common.Sampler(sampler.name, run, cost=sampler.cost, order=sampler.order, options=sampler.options)
    return run
