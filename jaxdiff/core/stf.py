"""Stable target field (STF): a lower-variance regression target for denoising training.

Xu, Tong, Jaakkola, Tian, "Stable Target Field for Reduced Variance Score Estimation in Diffusion Models",
ICLR 2023 (arXiv:2302.00670), Sec. 4, the STF objective (Eq. 3). For a noisy x_i = y_i + sigma_i * eps_i and a
reference batch {y_j} that contains y_i, the weighted conditional score

    sum_j w_ij * grad log p(x_i | y_j),   w_ij = softmax_j( -||x_i - y_j||^2 / (2 sigma_i^2) ),

replaces the one-sample score grad log p(x_i | y_i). In sigma-space (x = y + sigma * eps) that score is
(y - x) / sigma^2, so in the denoiser (x0) space of this library the target is simply

    target_i = sum_j w_ij * y_j,

the posterior mean E[y | x_i] of the *empirical* distribution of the reference batch. With the whole dataset as
reference it is the exact posterior mean of the data (`analytic.Empirical.denoiser`); sigma -> 0 gives y_i,
sigma -> inf the reference mean. The target depends on the reference only as a set: the order of its rows is
irrelevant (the SPEC's "first B rows are the minibatch" is the convention that guarantees y_i is in the set).

Everything here is pure and jittable; no Flax, no config, no I/O.
"""
import jax
import jax.numpy as jnp

from jaxdiff.core import analytic, precond


def _checked(x_noisy, sigma, reference):
    """x_noisy [B, ...], sigma scalar/[B]/[B,1,..], reference [R, ...] in one float dtype; checks shapes at trace
    time."""
    x_noisy, reference = jnp.asarray(x_noisy), jnp.asarray(reference)
    if x_noisy.ndim < 2 or reference.ndim != x_noisy.ndim or x_noisy.shape[1:] != reference.shape[1:]:
        raise ValueError(f'stf: x_noisy {x_noisy.shape} and reference {reference.shape} must be [B, ...] and [R, ...] '
                         'with the same per-example shape')
    if reference.shape[0] < 1:
        raise ValueError('stf: the reference batch is empty')
    dtype = jnp.promote_types(jnp.promote_types(x_noisy.dtype, reference.dtype), jnp.float32)
    batch_size = x_noisy.shape[0]
    sigma = jnp.asarray(sigma, dtype)
    if sigma.size not in (1, batch_size):
        raise ValueError(f'stf: sigma has shape {sigma.shape}; expected a scalar or [{batch_size}]')
    return x_noisy.astype(dtype), sigma, reference.astype(dtype)


def target(x_noisy, sigma, reference, *, chunk_size=None):
    """STF target sum_j w_ij y_j, w_ij = softmax_j(-||x_i - y_j||^2 / (2 sigma_i^2)) (Xu et al. 2023, Eq. 3): the
    empirical posterior mean of the reference batch, `analytic.empirical_posterior_mean`.

    Args:
      x_noisy: [B, ...] noisy inputs x_i = y_i + sigma_i * eps_i.
      sigma: scalar or [B] noise levels (sigma-space).
      reference: [R, ...] clean reference images; by convention its first B rows are the clean images of x_noisy.
      chunk_size: reference rows per chunk of the streaming log-sum-exp; None = all at once (memory O(B * R),
        the fastest when it fits: 4 MiB of logits at B=64, R=16384).
    Returns:
      [B, ...] float32 (float64 if the inputs are), without gradient (`jax.lax.stop_gradient`).
    """
    x, sigma, y = _checked(*jax.lax.stop_gradient((x_noisy, sigma, reference)))
    return jax.lax.stop_gradient(analytic.empirical_posterior_mean(x, sigma, y, chunk_size=chunk_size))


def draw_reference_given_x(key, x_noisy, sigma, data, reference_size):
    """Reference batches as in the paper's bias / trace-of-covariance analysis (Sec. 4): y_1 ~ p(y | x_i) and
    y_2..y_R ~ p_0.

    p_0 is the empirical distribution of `data` [N, ...] and p(y | x_i) its exact posterior at noise level sigma_i,
    so the targets over many draws have the law of the STF target given x_i. Returns [B, R, ...]. (Training draws
    the reference from the input pipeline instead; this is for measuring the target's bias and covariance.)
    """
    x, sigma, y = _checked(x_noisy, sigma, data)
    batch_size = x.shape[0]
    sigma = precond.per_example(sigma, x).reshape(batch_size)
    logits = analytic.empirical_logits(x.reshape(batch_size, -1), sigma, y.reshape(y.shape[0], -1))
    key_own, key_rest = jax.random.split(key)
    own = jax.random.categorical(key_own, logits, axis=1)                                       # [B]
    rest = jax.random.randint(key_rest, (batch_size, reference_size - 1), 0, y.shape[0])     # [B, R-1]
    index = jnp.concatenate([own[:, None], rest], axis=1)
    return jnp.asarray(data)[index]
