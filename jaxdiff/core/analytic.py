"""Exact denoisers (ground truth) and the reference ODE solve.

For data x0 ~ p and x = x0 + sigma * eps, the ideal denoiser is the posterior mean D(x, sigma) = E[x0 | x]
(Karras et al. 2022, Eq. 2-3). For a Gaussian mixture and for a finite dataset it has a closed form, so samplers
and training targets can be checked against an exact answer instead of another approximation.
"""
import jax
import jax.numpy as jnp

from jaxdiff.core.precond import per_example

# The logits divide by sigma^2, so a TF32 dot (what XLA may use for float32 on recent GPUs) would blur distances
# at small sigma; HIGHEST keeps the dots in full float32.
_PRECISION = jax.lax.Precision.HIGHEST


class GaussianMixture:
    """x0 ~ sum_k w_k N(mu_k, s_k^2 I) with isotropic per-component std; any per-example shape.

    means [K, ...], stds [K], weights [K] (normalised here). Computations run in the dtype of `means`.
    Exact posterior mean: with v_k = s_k^2 + sigma^2, the noisy data is sum_k w_k N(mu_k, v_k I), so
      p(k | x) = softmax_k(log w_k - |x - mu_k|^2 / (2 v_k) - (d/2) log v_k),
      E[x0 | x, k] = mu_k + (s_k^2 / v_k) (x - mu_k)   (Gaussian conditioning),
      D(x, sigma) = sum_k p(k | x) E[x0 | x, k].
    """

    def __init__(self, means, stds, weights):
        self.means = jnp.asarray(means)
        self.dtype = self.means.dtype
        self.stds = jnp.asarray(stds, self.dtype)
        weights = jnp.asarray(weights, self.dtype)
        num = self.means.shape[0]
        if self.stds.shape != (num,) or weights.shape != (num,):
            raise ValueError(f'GaussianMixture: means [K, ...], stds [K] and weights [K] must agree on K; got means '
                             f'{self.means.shape}, stds {self.stds.shape}, weights {weights.shape}')
        self.weights = weights / jnp.sum(weights)
        self.event_shape = self.means.shape[1:]
        self._means_flat = self.means.reshape(num, -1)

    def _posterior(self, x, sigma):
        """Responsibilities p(k | x) [B, K] and shrinkage gains s_k^2 / v_k [B, K] for x [B, d]."""
        sigma = per_example(jnp.asarray(sigma, self.dtype), x)                               # [B, 1]
        var = self.stds[None, :] ** 2 + sigma ** 2                                           # v_k, [B, K]
        sq = jnp.sum((x[:, None, :] - self._means_flat[None]) ** 2, axis=-1)                 # [B, K]
        logits = jnp.log(self.weights)[None] - 0.5 * sq / var - 0.5 * x.shape[1] * jnp.log(var)
        return jax.nn.softmax(logits, axis=1), self.stds[None, :] ** 2 / var

    def denoiser(self, x, sigma):
        """Exact E[x0 | x0 + sigma * eps = x]; x [B, ...], sigma scalar or [B]."""
        x = jnp.asarray(x, self.dtype)
        flat = x.reshape(x.shape[0], -1)
        resp, gain = self._posterior(flat, sigma)
        # sum_k p_k (mu_k (1 - g_k) + g_k x): no [B, K, d] intermediate beyond the distance computation.
        out = (resp * (1 - gain)) @ self._means_flat + jnp.sum(resp * gain, axis=1, keepdims=True) * flat
        return out.reshape(x.shape)

    def score(self, x, sigma):
        """grad_x log p_sigma(x) = (D(x, sigma) - x) / sigma^2 (Tweedie; Karras et al. 2022, Eq. 3)."""
        return (self.denoiser(x, sigma) - x) / per_example(jnp.asarray(sigma, self.dtype), x) ** 2

    def sample(self, key, n):
        """n exact samples [n, ...] of the clean mixture."""
        key_k, key_z = jax.random.split(key)
        k = jax.random.categorical(key_k, jnp.log(self.weights), shape=(n,))
        z = jax.random.normal(key_z, (n,) + self.event_shape, self.dtype)
        return self.means[k] + self.stds[k].reshape((n,) + (1,) * len(self.event_shape)) * z


# ---------------------------------------------------------------- the posterior mean of a finite dataset

def empirical_logits(x, sigma, y):
    """-|x_i - y_j|^2 / (2 sigma_i^2) up to a per-row constant, in matmul form: (x_i . y_j - |y_j|^2 / 2) / sigma_i^2.

    |x_i|^2 / (2 sigma_i^2) is dropped: it is constant in j, so the softmax over j does not see it, and leaving it
    out avoids a large cancellation. x [B, d], sigma [B], y [C, d] -> [B, C].
    """
    x_dot_y = jnp.matmul(x, y.T, precision=_PRECISION)
    return (x_dot_y - 0.5 * jnp.sum(y * y, axis=-1)) / jnp.square(sigma)[:, None]


def _chunk_sums(x, sigma, y, valid=None):
    """(m, s, acc) of one block of rows y: m_i = max_j l_ij, s_i = sum_j e_ij, acc_i = sum_j e_ij y_j with
    e_ij = exp(l_ij - m_i); rows where `valid` is False get weight 0. The posterior mean is acc_i / s_i."""
    logits = empirical_logits(x, sigma, y)
    if valid is not None:
        # a finite sentinel and an explicit zero weight, no -inf: XLA's fused CPU exp can turn exp(-inf - m) into NaN
        logits = jnp.where(valid[None, :], logits, jnp.finfo(logits.dtype).min)
    m = jnp.max(logits, axis=1)
    e = jnp.exp(logits - m[:, None])
    if valid is not None:
        e = jnp.where(valid[None, :], e, 0.0)
    return m, jnp.sum(e, axis=1), jnp.matmul(e, y, precision=_PRECISION)


def merge_sums(sums_a, sums_b):
    """(m, s, acc) of the union of two disjoint sets of rows: the online log-sum-exp update."""
    (m_a, s_a, acc_a), (m_b, s_b, acc_b) = sums_a, sums_b
    m = jnp.maximum(m_a, m_b)
    rescale_a, rescale_b = jnp.exp(m_a - m), jnp.exp(m_b - m)
    return m, s_a * rescale_a + s_b * rescale_b, acc_a * rescale_a[:, None] + acc_b * rescale_b[:, None]


def empirical_sums(x, sigma, y, chunk_size=None):
    """The streaming log-sum-exp state (m, s, acc) of `empirical_posterior_mean` over all rows of y, read in chunks.

    x [B, d], sigma [B], y [N, d] (flattened). E[y | x_i] = acc_i / s_i; states of disjoint row sets combine with
    `merge_sums` (or across devices: pmax of m, psum of the rescaled s and acc). Memory O(B * chunk + chunk * d)
    instead of O(B * N) for one chunk, or O(B * N * d) for the broadcast form |x_i - y_j|^2. Chunks are read in
    place with dynamic slices (no padded copy of y); the last chunk is shifted back to end at row N and the rows it
    shares with the previous chunk are masked out. chunk_size None (or >= N): one chunk.
    """
    num = y.shape[0]
    if chunk_size is None or chunk_size >= num:
        return _chunk_sums(x, sigma, y)
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f'chunk_size must be a positive integer or None, got {chunk_size!r}')
    chunk_size = int(chunk_size)
    num_chunks = -(-num // chunk_size)

    def body(i, sums):
        first = i * chunk_size
        start = jnp.minimum(first, num - chunk_size)
        rows = start + jnp.arange(chunk_size)
        y_c = jax.lax.dynamic_slice_in_dim(y, start, chunk_size)
        return merge_sums(sums, _chunk_sums(x, sigma, y_c, valid=rows >= first))

    # The first (always full) chunk starts the carry, so no -inf initial value is needed.
    return jax.lax.fori_loop(1, num_chunks, body, _chunk_sums(x, sigma, y[:chunk_size]))


def empirical_posterior_mean(x, sigma, data, *, chunk_size=None):
    """E[y | x] for y uniform over the rows of `data` and x = y + sigma * eps:

      D(x_i, sigma_i) = sum_j softmax_j(-|x_i - y_j|^2 / (2 sigma_i^2)) y_j

    (the ideal denoiser of a finite training set, Karras et al. 2022, App. B.3; the STF target, Xu et al. 2023,
    Eq. 3). x [B, ...], sigma scalar, [B] or [B, 1, ...], data [N, ...] with x's per-example shape and dtype.
    """
    batch = x.shape[0]
    x_flat, y = x.reshape(batch, -1), data.reshape(data.shape[0], -1)
    _, s, acc = empirical_sums(x_flat, per_example(sigma, x).reshape(batch), y, chunk_size)
    return (acc / s[:, None]).reshape(x.shape)


class Empirical:
    """The empirical distribution of a finite dataset y_1..y_N (data [N, ...]); its exact posterior mean
    `empirical_posterior_mean` (Karras et al. 2022, App. B.3), streamed over data chunks of `chunk_size`
    rows, so memory is O(B * chunk_size + chunk_size * d), not O(B * N). `chunk_size=None` uses one chunk.
    """

    def __init__(self, data, chunk_size=4096):
        data = jnp.asarray(data)
        if data.ndim < 2 or data.shape[0] < 1:
            raise ValueError(f'Empirical: data must be [N, ...] with N >= 1, got shape {data.shape}')
        num = data.shape[0]
        chunk = num if chunk_size is None else chunk_size
        if int(chunk) != chunk or chunk < 1:
            raise ValueError(f'Empirical: chunk_size must be a positive integer or None, got {chunk_size!r}')
        self.data = data
        self.dtype = data.dtype
        self.event_shape = data.shape[1:]
        self.chunk_size = min(int(chunk), num)

    def denoiser(self, x, sigma):
        """Exact posterior mean of the dataset; x [B, ...], sigma scalar or [B]."""
        x = jnp.asarray(x, self.dtype)
        return empirical_posterior_mean(x, jnp.asarray(sigma, self.dtype), self.data, chunk_size=self.chunk_size)

    def sample(self, key, n):
        """n exact samples: rows of the dataset drawn uniformly with replacement."""
        return self.data[jax.random.randint(key, (n,), 0, self.data.shape[0])]


def reference_solve(denoiser, x_T, sigma_max, sigma_min=0.0, *, rtol=1e-10, atol=1e-10, sigma_stop=1e-5,
                    max_steps=100_000):
    """High-accuracy solution of the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (SPEC.md).

    Integrates with diffrax's adaptive Dopri5 in u = log sigma (dx/du = x - D), which is smooth on the whole
    interval. For `sigma_min == 0` it integrates to `sigma_stop` and returns D(x, sigma_stop): along the flow
    x(sigma) - x(0) = O(sigma^2) and D(x, sigma) = x + sigma^2 score, so the truncation error is O(sigma_stop^2)
    (exponentially small for a finite dataset). Run it in float64 (jax_enable_x64 and float64 x_T / denoiser)
    to get a reference; returns x at sigma_min.
    """
    from jaxdiff.core.samplers import adaptive                                                    # pure math, same layer
    if not 0 <= sigma_min < sigma_max:
        raise ValueError(f'reference_solve needs 0 <= sigma_min < sigma_max, got {sigma_min!r}, {sigma_max!r}')
    end = sigma_min if sigma_min > 0 else min(sigma_stop, 0.5 * sigma_max)
    x = adaptive.solve_log_sigma(denoiser, x_T, sigma_max, end, solver='dopri5', rtol=rtol, atol=atol,
                                 max_steps=max_steps)[0]
    if sigma_min > 0:
        return x
    return denoiser(x, jnp.asarray(end, x.dtype))
