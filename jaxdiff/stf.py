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
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

# The logits divide by sigma^2, so a TF32 dot (what XLA may use for float32 on recent GPUs) would blur distances
# at small sigma; HIGHEST keeps the dots in full float32.
_PRECISION = jax.lax.Precision.HIGHEST


def _flatten(x_noisy, sigma, reference):
    """[B, ...], sigma scalar/[B]/[B,1,..], [R, ...] -> float [B, D], [B], [R, D]; checks shapes at trace time."""
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
    sigma = jnp.broadcast_to(sigma.reshape(-1), (batch_size,))
    return (x_noisy.reshape(batch_size, -1).astype(dtype), sigma,
            reference.reshape(reference.shape[0], -1).astype(dtype))


def _logits(x, sigma, y):
    """-||x_i - y_j||^2 / (2 sigma_i^2) up to a per-row constant, in matmul form: (x_i.y_j - ||y_j||^2/2) / sigma_i^2.

    ||x_i||^2 / (2 sigma_i^2) is dropped: it is constant in j, so the softmax over j does not see it, and leaving it
    out avoids a large cancellation.
    """
    x_dot_y = jnp.matmul(x, y.T, precision=_PRECISION)                         # [B, C]
    return (x_dot_y - 0.5 * jnp.sum(y * y, axis=-1)) / jnp.square(sigma)[:, None]


def _chunk_sums(x, sigma, y, valid=None):
    """(m, s, acc) of one block of reference rows: m_i = max_j l_ij, s_i = sum_j e_ij, acc_i = sum_j e_ij y_j with
    e_ij = exp(l_ij - m_i); rows where `valid` is False get weight 0. target_i = acc_i / s_i."""
    logits = _logits(x, sigma, y)
    if valid is not None:
        logits = jnp.where(valid[None, :], logits, -jnp.inf)
    m = jnp.max(logits, axis=1)
    e = jnp.exp(logits - m[:, None])
    return m, jnp.sum(e, axis=1), jnp.matmul(e, y, precision=_PRECISION)


def _merge(sums_a, sums_b):
    """(m, s, acc) of the union of two disjoint reference sets: the online log-sum-exp update."""
    (m_a, s_a, acc_a), (m_b, s_b, acc_b) = sums_a, sums_b
    m = jnp.maximum(m_a, m_b)
    rescale_a, rescale_b = jnp.exp(m_a - m), jnp.exp(m_b - m)
    return m, s_a * rescale_a + s_b * rescale_b, acc_a * rescale_a[:, None] + acc_b * rescale_b[:, None]


def _partial_sums(x, sigma, y, chunk_size):
    """(m, s, acc) over all reference rows y, streamed in chunks of `chunk_size` rows.

    Memory O(B * chunk + chunk * D) (the logits of one chunk and, where XLA materialises the slice, its rows)
    instead of O(B * R) for one chunk, or O(B * R * D) for the broadcast form ||x_i - y_j||^2.

    Chunks are read in place with dynamic slices (no padded or re-laid-out copy of the reference). The last chunk
    is shifted back to end at row R; the rows it shares with the previous chunk are masked out.
    """
    num_ref = y.shape[0]
    if chunk_size is None or chunk_size >= num_ref:
        return _chunk_sums(x, sigma, y)
    if chunk_size < 1:
        raise ValueError(f'stf: chunk_size must be >= 1, got {chunk_size}')
    num_chunks = -(-num_ref // chunk_size)

    def body(i, sums):
        first = i * chunk_size
        start = jnp.minimum(first, num_ref - chunk_size)
        rows = start + jnp.arange(chunk_size)
        y_c = jax.lax.dynamic_slice_in_dim(y, start, chunk_size)
        return _merge(sums, _chunk_sums(x, sigma, y_c, valid=rows >= first))

    # The first (always full) chunk starts the carry, so no -inf initial value is needed.
    return jax.lax.fori_loop(1, num_chunks, body, _chunk_sums(x, sigma, y[:chunk_size]))


def target(x_noisy, sigma, reference, *, chunk_size=None):
    """STF target sum_j w_ij y_j, w_ij = softmax_j(-||x_i - y_j||^2 / (2 sigma_i^2)) (Xu et al. 2023, Eq. 3).

    Args:
      x_noisy: [B, ...] noisy inputs x_i = y_i + sigma_i * eps_i.
      sigma: scalar or [B] noise levels (sigma-space).
      reference: [R, ...] clean reference images; by convention its first B rows are the clean images of x_noisy.
      chunk_size: reference rows per chunk of the streaming log-sum-exp; None = all at once (memory O(B * R),
        the fastest when it fits: 4 MiB of logits at B=64, R=16384).
    Returns:
      [B, ...] float32 (float64 if the inputs are), without gradient (`jax.lax.stop_gradient`).
    """
    x, sigma_flat, y = _flatten(*jax.lax.stop_gradient((x_noisy, sigma, reference)))
    _, s, acc = _partial_sums(x, sigma_flat, y, chunk_size)
    return jax.lax.stop_gradient((acc / s[:, None]).reshape(jnp.shape(x_noisy)))


def target_local(x_noisy, sigma, reference, *, axis_name='data', chunk_size=None):
    """`target` against the *global* reference, called per device inside `shard_map` over `axis_name`.

    Each device holds a shard of the minibatch (x_noisy, sigma: [B/n, ...]) and a shard of the reference
    ([R/n, ...]); the result equals `target` of the concatenated minibatch against the concatenated reference.
    Instead of gathering the reference (R x D per device), the minibatch is gathered (B x D), each device computes
    the streaming partial sums of every sample against its reference shard, and the partial sums are combined
    across devices (pmax of the running max, psum of the rescaled sums, psum_scatter of the rescaled weighted
    image sums so each device keeps only its rows). Communication O(B * D) instead of O(R * D).
    """
    x, sigma_flat, y = _flatten(*jax.lax.stop_gradient((x_noisy, sigma, reference)))
    local_batch = x.shape[0]
    x_all = jax.lax.all_gather(x, axis_name, axis=0, tiled=True)                 # [B, D]
    sigma_all = jax.lax.all_gather(sigma_flat, axis_name, axis=0, tiled=True)     # [B]
    m, s, acc = _partial_sums(x_all, sigma_all, y, chunk_size)
    m_global = jax.lax.pmax(m, axis_name)                                        # `_merge` across devices
    rescale = jnp.exp(m - m_global)
    s_global = jax.lax.psum(s * rescale, axis_name)                              # [B]
    acc_mine = jax.lax.psum_scatter(acc * rescale[:, None], axis_name, scatter_dimension=0, tiled=True)
    start = jax.lax.axis_index(axis_name) * local_batch
    s_mine = jax.lax.dynamic_slice_in_dim(s_global, start, local_batch)
    return jax.lax.stop_gradient((acc_mine / s_mine[:, None]).reshape(jnp.shape(x_noisy)))


def target_sharded(x_noisy, sigma, reference, *, mesh, axis_name='data', chunk_size=None):
    """`target` with the minibatch and the reference both sharded over `mesh` axis `axis_name` (usable in jit).

    Every sample sees all R reference images (a global reference, unlike the authors' per-GPU one); the result is
    sharded like x_noisy. B and R must be multiples of the axis size. (Plain `target` under jit on sharded global
    arrays is global too, and XLA's partitioner chooses the same gather-x / reduce-partial-sums pattern; this
    function makes that pattern explicit and independent of the partitioner.)
    """
    num_devices = mesh.shape[axis_name]
    batch_size, num_ref = jnp.shape(x_noisy)[0], jnp.shape(reference)[0]
    if batch_size % num_devices or num_ref % num_devices:
        raise ValueError(f'stf: batch size {batch_size} and reference size {num_ref} must be multiples of the '
                         f'{num_devices} devices on mesh axis {axis_name!r}')
    sigma = jnp.broadcast_to(jnp.reshape(jnp.asarray(sigma), (-1,)), (batch_size,))  # scalar or [B] -> [B]
    spec = PartitionSpec(axis_name)
    if mesh.axis_types[mesh.axis_names.index(axis_name)] == jax.sharding.AxisType.Explicit:
        # sharding-in-types meshes (the `jax.make_mesh` default) need the inputs laid out as in_specs say
        x_noisy, sigma, reference = jax.reshard((x_noisy, sigma, reference), NamedSharding(mesh, spec))
    local = functools.partial(target_local, axis_name=axis_name, chunk_size=chunk_size)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)(x_noisy, sigma, reference)


def draw_reference_given_x(key, x_noisy, sigma, data, reference_size):
    """Reference batches as in the paper's bias / trace-of-covariance analysis (Sec. 4): y_1 ~ p(y | x_i) and
    y_2..y_R ~ p_0.

    p_0 is the empirical distribution of `data` [N, ...] and p(y | x_i) its exact posterior at noise level sigma_i,
    so the targets over many draws have the law of the STF target given x_i. Returns [B, R, ...]. (Training draws
    the reference from the input pipeline instead; this is for measuring the target's bias and covariance.)
    """
    x, sigma_flat, y = _flatten(x_noisy, sigma, data)
    key_own, key_rest = jax.random.split(key)
    own = jax.random.categorical(key_own, _logits(x, sigma_flat, y), axis=1)                    # [B]
    rest = jax.random.randint(key_rest, (x.shape[0], reference_size - 1), 0, y.shape[0])     # [B, R-1]
    index = jnp.concatenate([own[:, None], rest], axis=1)
    return jnp.asarray(data)[index]
