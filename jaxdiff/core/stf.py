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

The training loss uses it as a target piece (config.loss.target='stf'; jaxdiff.core.losses): `loss_target` builds
it with its hooks, and `prepare_reference` assembles each step's reference batch.

Everything here is pure and jittable; no Flax, no config, no I/O.
"""
import jax
import jax.numpy as jnp

from jaxdiff.core import analytic, losses, precond
from jaxdiff.core.errors import UserError


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


# ---------------------------------------------------------------- the target as a piece of the training loss

def loss_target(*, reference_size=None, reference_chunk_size=None):
    """loss.target='stf' (`jaxdiff.core.losses`): (target, Hooks). The target is `target` (Eq. 3), sum_j
    softmax_j(-|x - y_j|^2 / (2 sigma^2)) y_j over batch['reference'] [R, ...] (the minibatch's clean images, then
    R - B others, assembled by `prepare_reference`). It is an x0-space target, so EDM, VP and VE all regress D to
    it unchanged. Under jit the arrays are global: every sample sees all R images however the batch is sharded. No
    gradient flows into it.

    Hooks: the input pipeline fetches the R - B extra images (data stream 1) as batch['reference_extra'];
    R >= the batch size and a multiple of the device count; under pmap the reference would be per device."""
    if reference_size is None:
        raise ValueError("loss.target='stf' needs loss.reference_size (R, the global reference batch size)")

    def stable_target(x_noisy, sigma, batch):
        reference = batch.get('reference', batch['image'])      # absent when R = B: the minibatch alone
        return target(x_noisy, sigma, reference, chunk_size=reference_chunk_size)

    def check(batch_size, num_devices, parallelism, host_callbacks_in_step):
        del host_callbacks_in_step
        if not isinstance(reference_size, int) or reference_size < batch_size:
            raise UserError(f'config.loss.reference_size={reference_size} must be an integer >= '
                            f'training.batch_size={batch_size}: the STF reference batch holds the minibatch plus '
                            f'R - B other images')
        if reference_size % num_devices:
            raise UserError(f'config.loss.reference_size={reference_size} is not divisible by the number of '
                            f'devices ({num_devices}); use a multiple of {num_devices}')
        if parallelism != 'jit':
            raise UserError("config.loss.target='stf' needs training.parallelism='jit' (a global reference batch)")

    def rows_for(batch_size):
        return (losses.Rows('reference_extra', reference_size - batch_size, stream=1),) \
            if reference_size > batch_size else ()
    return stable_target, losses.Hooks(rows=rows_for, prepare=prepare_reference, check=check)


def prepare_reference(batch, key, augment, step=None):
    """The reference batch of a training step (the prepare hook of `loss_target`): batch['reference'] = the
    minibatch's (augmented) clean images, then the R - B images of batch['reference_extra'] (data stream 1),
    augmented like training images, independently per image. Their augmentation labels are dropped: the target is
    a weighted average of augmented clean images and never reads labels (as in the authors' code, the weights
    ignore how each image was augmented)."""
    del step
    if 'reference_extra' not in batch:
        return batch
    extra = batch['reference_extra']
    if augment is not None:
        extra, _ = augment(jax.random.fold_in(key, 1), extra)
    batch = {name: value for name, value in batch.items() if name != 'reference_extra'}
    return {**batch, 'reference': jnp.concatenate([batch['image'], extra])}
