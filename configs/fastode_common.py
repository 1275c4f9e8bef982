"""Sections shared by the Fast-ODE recipes (Lee, Kim, Ye, ICML 2023, github.com/sangyun884/fast-ode) and their
independent rectified-flow baselines: the flow loss, the encoder section, the EMA decay as a half-life, horizontal
flips, and the authors' sampling grid (uniform in flow time).

    config.loss    = dict(parameterization='flow', pairing='fastode', beta=...)   (jaxdiff.core.flow; 'independent': the
                     rectified-flow baseline, their --independent)
    config.encoder = dict(name='fastode_encoder' | 'fastode_mlp_encoder', ...)   q(z | x), the extra network
Every recipe lists these fields, so each can be changed from the command line (e.g. --config.loss.beta=5,
--config.loss.pairing=independent).
"""
import math


def loss_fields(*, beta, pairing='fastode', t_min=1e-5):
    """config.loss of Fast-ODE: the flow (t ~ U(t_min, 1), time fed raw) with the learned coupling and weight beta
    of the KL; pairing='independent' is the rectified-flow baseline (no encoder, no KL)."""
    return dict(parameterization='flow', pairing=pairing, beta=beta, t_min=t_min)


def ema_halflife_images(decay, batch_size):
    """EDM's EMA half-life (in images) of a per-step decay: 0.5 ** (batch_size / halflife) = decay, i.e.
    halflife = batch_size ln(0.5) / ln(decay) (0.9999 at batch 128: 887,184 images = 6,931 steps). With
    training.ema_rampup_ratio=None the decay is constant from the first step, as the authors' EMA."""
    return round(batch_size * math.log(0.5) / math.log(decay))


def flips():
    """config.augment for horizontal flips only (the authors' RandomHorizontalFlip): EDM's pipe with every
    transform off except xflip, which fires with probability p * xflip = 1 and then flips with probability 1/2."""
    return dict(p=1.0, xflip=1.0, yflip=0.0, scale=0.0, rotate_frac=0.0, aniso=0.0, translate_frac=0.0)


def sampling_fields(*, sampler, num_steps, num_samples, batch_size, sigma_max=999.0):
    """config.sampling on the authors' grid: uniform in flow time from t(sigma_max) = 0.999 (their t = 1) to 0 (schedule
    'flow_uniform'); Euler on it is their `sample_ode_generative`. Any sampler / schedule can replace it, but
    sigma-space Heun wants a geometric grid (EDM's, the default of common.sampling): on this one its first step
    extrapolates (see `jaxdiff.core.flow.uniform_schedule`)."""
    return dict(sampler=sampler, schedule='flow_uniform',
                schedule_options=dict(num_steps=num_steps, sigma_max=sigma_max), num_samples=num_samples,
                batch_size=batch_size)
