"""Exact denoisers against independent computations: Monte-Carlo posterior means, autodiff of the log density,
the unchunked softmax, and the closed-form flow of a single Gaussian."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.core import analytic


def _mixture(dtype=jnp.float32, d=2):
    means = jnp.asarray([[-2.0, 0.5], [1.5, 1.0], [0.0, -2.0]], dtype)[:, :d]
    return analytic.GaussianMixture(means, jnp.asarray([0.3, 0.6, 0.4], dtype), jnp.asarray([0.5, 0.2, 0.3], dtype))


@pytest.mark.parametrize('sigma', [0.5, 1.5])
def test_gmm_denoiser_equals_monte_carlo_posterior_mean(sigma):
    # Self-normalised importance sampling with the prior as proposal: E[x0 | x] = E_p[x0 w] / E_p[w],
    # w = N(x; x0, sigma^2 I); error bar from the delta method.
    gmm = _mixture()
    x = jnp.array([[0.3, -0.4], [-1.0, 1.2], [1.0, 1.0]])
    x0 = np.asarray(gmm.sample(jax.random.key(0), 400_000), np.float64)
    exact = np.asarray(gmm.denoiser(x, sigma), np.float64)
    for b in range(x.shape[0]):
        logw = -np.sum((np.asarray(x[b], np.float64) - x0) ** 2, axis=1) / (2 * sigma ** 2)
        w = np.exp(logw - logw.max())
        estimate = (w[:, None] * x0).sum(0) / w.sum()
        stderr = np.sqrt((w[:, None] ** 2 * (x0 - estimate) ** 2).sum(0)) / w.sum()
        assert np.all(np.abs(exact[b] - estimate) < 4 * stderr + 1e-4), (exact[b], estimate, stderr)


def test_gmm_score_is_the_gradient_of_the_log_density():
    with jax.enable_x64(True):
        gmm = _mixture(jnp.float64)
        x = jnp.array([[0.3, -0.4], [-1.0, 1.2]])
        sigma = jnp.array([0.2, 3.0])

        def log_density(xb, sb):                      # log sum_k w_k N(x; mu_k, (s_k^2 + sigma^2) I)
            var = gmm.stds ** 2 + sb ** 2
            sq = jnp.sum((xb[None] - gmm.means) ** 2, axis=1)
            return jax.scipy.special.logsumexp(jnp.log(gmm.weights) - sq / (2 * var) - jnp.log(2 * jnp.pi * var))

        expect = jax.vmap(jax.grad(log_density))(x, sigma)
        np.testing.assert_allclose(gmm.score(x, sigma), expect, rtol=1e-10, atol=1e-12)


def test_gmm_any_shape_dtype_and_per_example_sigma():
    rng = np.random.default_rng(0)
    means = rng.normal(size=(3, 4, 4, 2))
    with jax.enable_x64(True):
        gmm64 = analytic.GaussianMixture(jnp.asarray(means), jnp.array([0.2, 0.3, 0.1]), jnp.array([1.0, 2.0, 1.0]))
        x = jnp.asarray(rng.normal(size=(5, 4, 4, 2)))
        sig = jnp.array([0.01, 0.1, 1.0, 10.0, 100.0])
        out = gmm64.denoiser(x, sig)
        assert out.dtype == jnp.float64 and out.shape == x.shape
        per_row = jnp.concatenate([gmm64.denoiser(x[i:i + 1], sig[i]) for i in range(5)])
        np.testing.assert_allclose(out, per_row, rtol=1e-12)
        # sigma -> infinity: the data mean; samples: the mixture's mean
        np.testing.assert_allclose(gmm64.denoiser(x[:1], 1e6)[0], jnp.tensordot(gmm64.weights, gmm64.means, 1),
                                   atol=1e-6)
        samples = gmm64.sample(jax.random.key(1), 20_000)
        assert samples.shape == (20_000, 4, 4, 2)
        np.testing.assert_allclose(samples.mean(0), jnp.tensordot(gmm64.weights, gmm64.means, 1), atol=0.05)
    gmm32 = _mixture()
    assert gmm32.denoiser(jnp.zeros((2, 2)), 1.0).dtype == jnp.float32
    with pytest.raises(ValueError, match='agree on K'):
        analytic.GaussianMixture(jnp.zeros((3, 2)), jnp.ones(2), jnp.ones(3))


def test_empirical_chunked_equals_unchunked_and_the_softmax_formula():
    rng = np.random.default_rng(0)
    data = rng.uniform(-1, 1, size=(50, 3, 2)).astype(np.float32)
    x = jnp.asarray(rng.normal(size=(6, 3, 2)), jnp.float32)
    sig = jnp.array([0.05, 0.2, 0.5, 1.0, 3.0, 30.0])
    whole = analytic.Empirical(data, chunk_size=None).denoiser(x, sig)
    for chunk in (1, 7, 50, 64):
        np.testing.assert_allclose(analytic.Empirical(data, chunk_size=chunk).denoiser(x, sig), whole,
                                   rtol=1e-5, atol=1e-6)
    y, xf = data.reshape(50, -1).astype(np.float64), np.asarray(x, np.float64).reshape(6, -1)
    logits = -((xf[:, None] - y[None]) ** 2).sum(-1) / (2 * np.asarray(sig, np.float64)[:, None] ** 2)
    w = np.exp(logits - logits.max(1, keepdims=True))
    expect = (w / w.sum(1, keepdims=True)) @ y
    np.testing.assert_allclose(np.asarray(whole).reshape(6, -1), expect, rtol=1e-4, atol=1e-5)
    # sigma -> 0: the nearest data point
    near = analytic.Empirical(data, chunk_size=8).denoiser(jnp.asarray(data[:4] + 1e-3), 1e-3)
    np.testing.assert_allclose(near, data[:4], atol=1e-6)


@pytest.mark.parametrize('chunk_size', [None, 7, 64])
def test_empirical_denoiser_and_stf_target_are_one_computation(chunk_size):
    """The posterior mean of a finite dataset has one implementation: analytic.Empirical.denoiser and stf.target
    (the dataset as the reference) give the same bits."""
    from jaxdiff.core import stf
    rng = np.random.default_rng(2)
    data = rng.uniform(-1, 1, size=(150, 4, 2)).astype(np.float32)
    x = jnp.asarray(rng.normal(size=(5, 4, 2)), jnp.float32)
    sig = jnp.array([0.01, 0.1, 0.7, 4.0, 60.0])
    got = analytic.Empirical(data, chunk_size=chunk_size).denoiser(x, sig)
    np.testing.assert_array_equal(got, stf.target(x, sig, data, chunk_size=chunk_size))
    np.testing.assert_array_equal(got, analytic.empirical_posterior_mean(x, sig, jnp.asarray(data),
                                                                         chunk_size=chunk_size))


def test_reference_solve_matches_the_closed_form_flow_of_a_gaussian():
    # x0 ~ N(mu, s^2 I): the PF-ODE flow is x(sigma) = mu + sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_T^2) (x_T - mu).
    with jax.enable_x64(True):
        mu, s = jnp.array([[0.5, -1.0, 2.0]]), 0.3
        gauss = analytic.GaussianMixture(mu, jnp.array([s]), jnp.array([1.0]))
        x_T = jax.random.normal(jax.random.key(0), (4, 3), jnp.float64) * 80.0
        flow = lambda sigma: mu + np.sqrt(s ** 2 + sigma ** 2) / np.sqrt(s ** 2 + 80.0 ** 2) * (x_T - mu)
        np.testing.assert_allclose(analytic.reference_solve(gauss.denoiser, x_T, 80.0, 0.5), flow(0.5), atol=1e-8)
        np.testing.assert_allclose(analytic.reference_solve(gauss.denoiser, x_T, 80.0, 0.0), flow(0.0), atol=1e-8)


def test_empirical_is_finite_and_exact_far_from_the_data_at_tiny_sigma():
    # logits ~ 1e11 here: the online log-sum-exp must not produce inf - inf (a 2-step Heun reaches such points)
    rng = np.random.default_rng(1)
    data = rng.uniform(-1, 1, size=(300, 16)).astype(np.float32)
    x = jnp.asarray(rng.normal(size=(3, 16)) * 1e5, jnp.float32)
    nearest = data[np.argmax(np.asarray(x, np.float64) @ data.T.astype(np.float64)
                             - 0.5 * (data.astype(np.float64) ** 2).sum(1), axis=1)]
    for chunk in (None, 128):
        np.testing.assert_array_equal(analytic.Empirical(data, chunk_size=chunk).denoiser(x, 0.002), nearest)
