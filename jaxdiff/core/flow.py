"""Rectified flow seen as a sigma-space denoiser, and the Fast-ODE learned forward process.

Lee, Kim, Ye, "Minimizing Trajectory Curvature of ODE-based Generative Models" (ICML 2023), as their public code
does it. Flow convention: data x at t = 0, noise z at t = 1,

    x_t = t z + (1 - t) x,    v = dx_t/dt = z - x                               (Sec. 2, Eqs. 3-4; Liu et al. 2022)

and the network v_theta(x_t, t) regresses v with t ~ U(t_min, 1), t_min = 1e-5, the time fed raw (no x1000).
Fast-ODE replaces the independent z ~ N(0, I) by an encoder q_phi(z | x) = N(mu_phi(x), diag exp(logvar_phi(x)))
trained jointly with the flow (Sec. 3, a time-conditional beta-VAE):

    L(theta, phi) = E || v_theta(x_t, t) - (z - x) ||^2  +  beta * KL(q_phi(z | x) || N(0, I)) / (C H W),

z = mu + exp(logvar / 2) eps reparameterised, so phi gets gradients through x_t and through the target; the KL is
summed over pixels, averaged over the batch and divided by the dimension C H W (their `get_kl`). Generation never
uses the encoder: z ~ N(0, I).

Public API (pure, jittable; `velocity_fn(x_t, t) -> v` with t [B]; `encoder_fn(x) -> (mu, logvar)` shaped like x):

    denoiser_from_velocity(velocity_fn) -> D(x, sigma)      SPEC.md: every jaxdiff sampler runs on a flow model
    precond(sigma), weight(sigma), sample_sigma(key, shape) the same flow as an EDM-style parameterization (eq. 7)
    sigma_of_t(t), t_of_sigma(sigma)                         sigma = t / (1 - t)
    sample_t(key, shape, t_min=1e-5)                         t ~ U(t_min, 1)
    interpolate(x, z, t), velocity_target(x, z)              x_t and v = z - x
    reparameterize(mu, logvar, eps)                          z = mu + exp(logvar / 2) eps
    gaussian_kl(mu, logvar, prior_var=1.)                    [B] KL(q || N(0, diag prior_var)), summed over dims
    prior_loss(mu, logvar, prior_var=1.)                     mean_B KL / dim (the authors' normalisation)
    uniform_schedule(num_steps, sigma_min, sigma_max)        schedules.get('flow_uniform'): uniform in t
    trajectory_in_time(trajectory, sigmas)                   a sampler's sigma-space trajectory as x_t, and t

Loss pieces (registered in jaxdiff.core.losses; config.loss = dict(parameterization='flow', pairing='fastode', beta=20)):
    parameterization(t_min=1e-5)                             loss.parameterization='flow'
    fastode_pairing(beta=20.)                                loss.pairing='fastode': z from the extra network
                                                             'encoder' (config.encoder), penalty beta KL / dim
With pairing='independent' the 'flow' parameterization is the rectified-flow baseline (their `--independent`).
Dropout keys of the networks are the caller's: close over them in velocity_fn / encoder_fn.
"""
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.core import losses, precond as precond_lib
from jaxdiff.core.errors import UserError


def sigma_of_t(t):
    """sigma = t / (1 - t): x_t / (1 - t) = x + sigma z is the VE form x0 + sigma eps of SPEC.md."""
    return t / (1 - t)


def t_of_sigma(sigma):
    """t = sigma / (1 + sigma), the inverse of `sigma_of_t`."""
    return sigma / (1 + sigma)


def denoiser_from_velocity(velocity_fn):
    """The sigma-space denoiser of a rectified-flow velocity model (SPEC.md):

        t = sigma / (1 + sigma),  x_t = x / (1 + sigma),  D(x, sigma) = x_t - t v(x_t, t).

    Why: x_t = t z + (1 - t) x0 gives x = x_t / (1 - t) = x0 + sigma z, and E[x0 | x_t] = x_t - t E[z - x0 | x_t].
    velocity_fn(x_t, t) -> v with t of shape [B]; sigma is a scalar or [B]. If velocity_fn carries
    `with_aux(x_t, t) -> (v, aux)` (samplers/common.py's aux convention, e.g. the UNet bottleneck AMED reads), the
    denoiser carries `with_aux` too.
    """
    def convert(x, sigma):
        sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])
        t = t_of_sigma(sigma)
        return x / precond_lib.per_example(1 + sigma, x, x.dtype), t

    def denoiser(x, sigma):
        x_t, t = convert(x, sigma)
        return x_t - precond_lib.per_example(t, x, x.dtype) * velocity_fn(x_t, t).astype(x.dtype)

    if hasattr(velocity_fn, 'with_aux'):
        def with_aux(x, sigma):
            x_t, t = convert(x, sigma)
            v, aux = velocity_fn.with_aux(x_t, t)
            return x_t - precond_lib.per_example(t, x, x.dtype) * v.astype(x.dtype), aux
        denoiser.with_aux = with_aux
    return denoiser


def precond(sigma):
    """The flow as EDM preconditioning (Karras et al. 2022, eq. 7: D = c_skip x + c_out F(c_in x; c_noise)) with the
    velocity network as F: c_skip = c_in = 1 / (1 + sigma), c_out = -sigma / (1 + sigma), c_noise = t. Equal to
    `denoiser_from_velocity`; lets `jaxdiff.models.denoiser.Denoiser` wrap a trained flow network unchanged."""
    sigma = jnp.asarray(sigma)
    c_in = 1 / (1 + sigma)
    return precond_lib.Coefficients(c_skip=c_in, c_out=-sigma * c_in, c_in=c_in, c_noise=t_of_sigma(sigma))


def weight(sigma):
    """lambda(sigma) = ((1 + sigma) / sigma)^2 = 1 / t^2: with x = x0 + sigma z, D - x0 = t (v_theta - (z - x0)),
    so lambda (D - x0)^2 is the flow-matching error (v_theta - (z - x0))^2 of Eq. 4."""
    return ((1 + sigma) / sigma) ** 2


def sample_t(key, shape, t_min=1e-5, dtype=jnp.float32):
    """Training times t ~ U(t_min, 1), drawn as the authors do: t = u (1 - t_min) + t_min, u ~ U[0, 1)."""
    return jax.random.uniform(key, shape, dtype) * (1 - t_min) + t_min


def sample_sigma(key, shape, t_min=1e-5):
    """The training noise levels of the flow in sigma-space: sigma = t / (1 - t) with t from `sample_t`."""
    return sigma_of_t(sample_t(key, shape, t_min))


def interpolate(x, z, t):
    """x_t = t z + (1 - t) x (Eq. 3); t [B] or scalar."""
    t = precond_lib.per_example(t, x, x.dtype)
    return t * z + (1 - t) * x


def velocity_target(x, z):
    """v = dx_t / dt = z - x (Eq. 4), the regression target of the velocity network."""
    return z - x


def reparameterize(mu, logvar, eps):
    """z = mu + exp(logvar / 2) eps, eps ~ N(0, I) (Kingma & Welling 2014): differentiable in mu and logvar."""
    return mu + jnp.exp(0.5 * logvar) * eps


def gaussian_kl(mu, logvar, prior_var=1.0):
    """KL(N(mu, diag exp(logvar)) || N(0, diag prior_var)) per example [B], summed over all non-batch axes:

        1/2 sum( log prior_var - logvar - 1 + (mu^2 + exp(logvar)) / prior_var ).

    prior_var broadcasts against one example (the authors' 2-D toy uses prior_var = (36, 1), their "wide prior")."""
    prior_var = jnp.asarray(prior_var, mu.dtype)
    per_element = jnp.log(prior_var) - logvar - 1 + (mu ** 2 + jnp.exp(logvar)) / prior_var
    return 0.5 * jnp.sum(per_element.reshape(mu.shape[0], -1), axis=1)


def prior_loss(mu, logvar, prior_var=1.0):
    """The authors' prior term: the per-example KL averaged over the batch and divided by the dimension (C H W)."""
    return jnp.mean(gaussian_kl(mu, logvar, prior_var)) / mu[0].size


def parameterization(*, t_min=1e-5):
    """The flow as a `losses.Parameterization` (loss.parameterization='flow'): `precond` (c_noise = t, fed raw to
    the velocity network), `weight` = 1 / t^2 and sigma = t / (1 - t) with t ~ U(t_min, 1), so the sigma-space loss
    lambda(sigma) |D - x0|^2 is the flow-matching loss |v_theta(x_t, t) - (z - x0)|^2 of Eq. 4 (see `weight`)."""
    if not 0 < t_min < 1:
        raise ValueError(f'config.loss.t_min={t_min!r} must be in (0, 1) (flow times t ~ U(t_min, 1))')
    return losses.Parameterization(precond=precond, weight=weight,
                                   sample_sigma=lambda key, shape: sample_sigma(key, shape, t_min))


def fastode_pairing(*, beta=20.0):
    """Fast-ODE's learned coupling as a `losses` pairing (loss.pairing='fastode'; Sec. 3):

        (mu, logvar) = encoder(x),  z = mu + exp(logvar / 2) eps,  penalty = beta KL(q(z | x) || N(0, I)) / (C H W)

    eps is drawn for the global batch (`losses.draw_per_example`), so 1 and 8 devices see the same numbers; the
    encoder is the extra trainable network 'encoder' (config.encoder, `models.from_config(config, 'encoder')`),
    under the model's optimizer and EMA, called in train mode with its own dropout key. z stays differentiable:
    phi gets gradients through x_t = t z + (1 - t) x and the target (the loss) and through the KL (the penalty).
    Metrics: loss_prior (the KL per dimension, before beta), encoder_mean_sq (mean mu^2) and encoder_var (mean
    exp(logvar)); q = N(0, I) gives 0, 0 and 1."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0:
        raise UserError(f'config.loss.beta={beta!r} must be a number >= 0 (the weight of the KL term)')

    def pairing(key, y, batch, params, networks):
        eps_key, encoder_key = jax.random.split(key)
        eps = losses.draw_per_example(eps_key, y.shape, lambda k, shape: jax.random.normal(k, shape, y.dtype), batch)
        mu, logvar = networks['encoder'](params['encoder'], y, key=encoder_key)
        if mu.shape != y.shape or logvar.shape != y.shape:
            raise ValueError(f"loss.pairing='fastode': the encoder must return mu and logvar shaped like the data "
                             f'{y.shape}, got {mu.shape} and {logvar.shape} (config.encoder)')
        mu, logvar = mu.astype(y.dtype), logvar.astype(y.dtype)
        loss_prior = prior_loss(mu, logvar)
        metrics = {'loss_prior': loss_prior, 'encoder_mean_sq': jnp.mean(mu ** 2),
                   'encoder_var': jnp.mean(jnp.exp(logvar))}
        return reparameterize(mu, logvar, eps), beta * loss_prior, metrics
    return pairing, losses.Hooks(extra_networks=('encoder',))


def uniform_schedule(*, num_steps=18, sigma_min=None, sigma_max=999.0):
    """schedules.get('flow_uniform'): a grid uniform in flow time t = sigma / (1 + sigma), N = num_steps positive
    points from t(sigma_max) down to t(sigma_min), then sigma = 0 (the schedules contract). sigma_min=None: uniform
    all the way to t = 0, t_i = t_max (1 - i / N), i = 0..N, the authors' Euler grid (their t_max = 1, sigma = inf;
    sigma-space samplers need sigma_max < inf: 999 is t = 0.999). Euler on it is their Euler in t: Euler in sigma on
    `denoiser_from_velocity(v)` steps x_t' = x_t + (t' - t) v(x_t, t). Computed in float64 (NumPy), returned in
    the default float dtype.

    Not a grid for sigma-space Heun (EDM Alg. 1): on a flow, its step t -> t' is x_t' = x_t + (t' - t) [(1 - 2t +
    t') v(x_t) + (1 - t') v(x_t')] / (2 (1 - t)) (substitute x = x_t / (1 - t), d = x_t + v / (1 + sigma)), whose
    weights stay in [0, 1] only while 1 - t' <= 2 (1 - t), i.e. sigma falls by at most about half per step; the first
    step here, t = 0.999 -> 0.916 (N = 12), weighs v by -41 and +42. Their Heun is Heun in t; use the EDM grid (or
    logsnr) for Heun and the multistep solvers."""
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f'flow_uniform: num_steps={num_steps!r} must be a positive integer')
    if not 0 < sigma_max < np.inf or (sigma_min is not None and not 0 < sigma_min < sigma_max):
        raise ValueError(f'flow_uniform: need 0 < sigma_min < sigma_max < inf (sigma_min None: down to 0), got '
                         f'sigma_min={sigma_min!r}, sigma_max={sigma_max!r}')
    t_max = sigma_max / (1 + sigma_max)
    if sigma_min is None:
        t = np.linspace(t_max, 0.0, int(num_steps) + 1)
    else:
        t = np.append(np.linspace(t_max, sigma_min / (1 + sigma_min), int(num_steps)), 0.0)
    return jnp.asarray(t / (1 - t), dtype=jnp.result_type(float))


def trajectory_in_time(trajectory, sigmas):
    """A sigma-space trajectory [len(sigmas), B, ...] as the flow's own x_t = x / (1 + sigma), with t [len(sigmas)];
    what `metrics.straightness` reads."""
    trajectory = jnp.asarray(trajectory)
    sigmas = jnp.asarray(sigmas, trajectory.dtype)
    scale = (1 / (1 + sigmas)).reshape((-1,) + (1,) * (trajectory.ndim - 1))
    return trajectory * scale, t_of_sigma(sigmas)
