"""Exact denoisers (ground truth) and the reference ODE solve.

For data x0 ~ p and x = x0 + sigma * eps, the ideal denoiser is the posterior mean D(x, sigma) = E[x0 | x]
(Karras et al. 2022, Eq. 2-3). For a Gaussian mixture and for a finite dataset it has a closed form, so samplers
and training targets can be checked against an exact answer instead of another approximation.
"""
import jax
import jax.numpy as jnp


def _sigma_per_example(sigma, batch, dtype):
    """sigma as a [B] array (SPEC: a denoiser accepts a scalar or [B])."""
    return jnp.broadcast_to(jnp.asarray(sigma, dtype), (batch,))


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
        sigma = _sigma_per_example(sigma, x.shape[0], self.dtype)
        var = self.stds[None, :] ** 2 + sigma[:, None] ** 2                                   # v_k, [B, K]
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
        sigma = _sigma_per_example(sigma, x.shape[0], self.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        return (self.denoiser(x, sigma.reshape(-1)) - x) / sigma ** 2

    def sample(self, key, n):
        """n exact samples [n, ...] of the clean mixture."""
        key_k, key_z = jax.random.split(key)
        k = jax.random.categorical(key_k, jnp.log(self.weights), shape=(n,))
        z = jax.random.normal(key_z, (n,) + self.event_shape, self.dtype)
        return self.means[k] + self.stds[k].reshape((n,) + (1,) * len(self.event_shape)) * z


class Empirical:
    """The empirical distribution of a finite dataset y_1..y_N (data [N, ...]); exact posterior mean

      D(x, sigma) = sum_i softmax_i(-|x - y_i|^2 / (2 sigma^2)) y_i

    (the optimal denoiser of a finite training set, Karras et al. 2022 App. B.3; STF, Xu et al. 2023, Eq. 4).
    The softmax runs over data chunks of `chunk_size` rows with an online log-sum-exp, so memory is
    O(B * chunk_size + chunk_size * d), not O(B * N). The |x|^2 term is the same for every i and drops out of the
    softmax, leaving logits (x . y_i - |y_i|^2 / 2) / sigma^2. `chunk_size=None` uses one chunk (unchunked).
    """

    def __init__(self, data, chunk_size=4096):
        data = jnp.asarray(data)
        if data.ndim < 2 or data.shape[0] < 1:
            raise ValueError(f'Empirical: data must be [N, ...] with N >= 1, got shape {data.shape}')
        self.data = data
        self.dtype = data.dtype
        self.event_shape = data.shape[1:]
        num = data.shape[0]
        flat = data.reshape(num, -1)
        chunk = num if chunk_size is None else int(chunk_size)
        if chunk < 1:
            raise ValueError(f'Empirical: chunk_size must be a positive integer or None, got {chunk_size!r}')
        chunk = min(chunk, num)
        num_chunks = -(-num // chunk)
        pad = num_chunks * chunk - num
        self.chunk_size = chunk
        self._chunks = jnp.pad(flat, ((0, pad), (0, 0))).reshape(num_chunks, chunk, -1)      # [C, chunk, d]
        self._half_sq = jnp.pad(0.5 * jnp.sum(flat ** 2, axis=1), (0, pad)).reshape(num_chunks, chunk)
        self._valid = (jnp.arange(num_chunks * chunk) < num).reshape(num_chunks, chunk)          # padding: False

    def denoiser(self, x, sigma):
        """Exact posterior mean of the dataset; x [B, ...], sigma scalar or [B]."""
        x = jnp.asarray(x, self.dtype)
        batch = x.shape[0]
        flat = x.reshape(batch, -1)
        inv_var = 1.0 / _sigma_per_example(sigma, batch, self.dtype) ** 2                   # [B]

        def absorb(carry, chunk):
            running_max, total, acc = carry
            y, half_sq, valid = chunk
            logits = (flat @ y.T - half_sq[None]) * inv_var[:, None]                          # [B, chunk]
            # finite sentinels, no -inf: XLA's fused CPU exp can turn exp(-inf - m) into NaN
            logits = jnp.where(valid[None], logits, lowest)
            new_max = jnp.maximum(running_max, jnp.max(logits, axis=1))
            rescale = jnp.exp(running_max - new_max)
            w = jnp.where(valid[None], jnp.exp(jnp.minimum(logits - new_max[:, None], 0.0)), 0.0)
            return (new_max, total * rescale + jnp.sum(w, axis=1), acc * rescale[:, None] + w @ y), None

        lowest = jnp.finfo(self.dtype).min
        init = (jnp.full((batch,), lowest, self.dtype), jnp.zeros((batch,), self.dtype), jnp.zeros_like(flat))
        (_, total, acc), _ = jax.lax.scan(absorb, init, (self._chunks, self._half_sq, self._valid))
        return (acc / total[:, None]).reshape(x.shape)

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
    from jaxdiff.samplers import adaptive                                                    # pure math, same layer
    if not 0 <= sigma_min < sigma_max:
        raise ValueError(f'reference_solve needs 0 <= sigma_min < sigma_max, got {sigma_min!r}, {sigma_max!r}')
    end = sigma_min if sigma_min > 0 else min(sigma_stop, 0.5 * sigma_max)
    x = adaptive.solve_log_sigma(denoiser, x_T, sigma_max, end, solver='dopri5', rtol=rtol, atol=atol,
                                 max_steps=max_steps)[0]
    if sigma_min > 0:
        return x
    return denoiser(x, jnp.asarray(end, x.dtype))
