"""Discriminator guidance (jaxdiff.core.guidance) on exact ground truth: the exact log density ratio of two Gaussian
mixtures, finite-difference gradients, transcriptions of the authors' EDM-G++ sampler, counted gradient calls."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import logsumexp

from jaxdiff.core import analytic, guidance, schedules, samplers
from jaxdiff.core.samplers import common

STDS = (0.2, 0.3, 0.25)


def _mixtures(dtype=jnp.float64, d=3):
    """A data mixture and a deliberately wrong 'model' (other weights, shifted means), and the exact log ratio."""
    rng = np.random.default_rng(6)
    means = rng.normal(size=(3, d))
    model_means = means + 0.4 * rng.normal(size=means.shape)
    weights, model_weights = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.5, 0.3])
    data = analytic.GaussianMixture(jnp.asarray(means, dtype), jnp.asarray(STDS, dtype), jnp.asarray(weights, dtype))
    model = analytic.GaussianMixture(jnp.asarray(model_means, dtype), jnp.asarray(STDS, dtype),
                                     jnp.asarray(model_weights, dtype))

    def log_density(m, w, x, sigma):             # log of sum_k w_k N(x; m_k, (s_k^2 + sigma^2) I)
        var = jnp.asarray(STDS, x.dtype)[None] ** 2 + jnp.reshape(sigma, (-1, 1)) ** 2
        sq = jnp.sum((x[:, None] - jnp.asarray(m, x.dtype)[None]) ** 2, -1)
        return logsumexp(jnp.log(jnp.asarray(w, x.dtype))[None] - 0.5 * sq / var
                         - 0.5 * x.shape[1] * jnp.log(2 * jnp.pi * var), axis=1)

    def log_ratio(x, sigma):                     # log(d* / (1 - d*)) = log p_data - log p_model (Kim et al., Thm. 1)
        return log_density(means, weights, x, sigma) - log_density(model_means, model_weights, x, sigma)
    return data, model, log_ratio


def _x(n=8, d=3, sigma=5.0, seed=1, dtype=jnp.float64):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, d), dtype) * sigma


def test_guidance_term_equals_a_finite_difference_gradient_of_the_logit():
    with jax.enable_x64(True):
        A = jax.random.normal(jax.random.PRNGKey(0), (4, 6), jnp.float64)
        b = jax.random.normal(jax.random.PRNGKey(1), (6,), jnp.float64)
        logit = lambda x, sigma: jnp.tanh(x @ A) @ b * jnp.log1p(sigma) + 0.1 * jnp.sum(x ** 2, -1) / sigma
        denoiser = lambda x, sigma: 0.5 * x
        sigma = jnp.array([0.05, 0.7, 3.0])
        x = jax.random.normal(jax.random.PRNGKey(2), (3, 4), jnp.float64)
        guided = guidance.discriminator_guided(denoiser, logit, weight=1.7)
        delta, log_ratio = guided.correction(x, sigma)
        h = 1e-6
        finite_difference = np.zeros(x.shape)
        for j in range(x.shape[1]):
            e = jnp.zeros_like(x).at[:, j].set(h)
            finite_difference[:, j] = (logit(x + e, sigma) - logit(x - e, sigma)) / (2 * h)
        np.testing.assert_allclose(delta, 1.7 * np.asarray(sigma)[:, None] ** 2 * finite_difference, rtol=1e-7)
        np.testing.assert_allclose(log_ratio, logit(x, sigma), rtol=1e-12)
        np.testing.assert_allclose(guided(x, sigma), denoiser(x, sigma) + delta, rtol=1e-12)


def test_the_exact_ratio_turns_the_wrong_model_into_the_data_model():
    with jax.enable_x64(True):
        data, model, log_ratio = _mixtures()
        guided = guidance.discriminator_guided(model.denoiser, log_ratio, weight=1.0)
        for sigma in (0.03, 0.4, 2.0, 20.0):
            x = _x(sigma=1 + sigma)
            assert float(jnp.max(jnp.abs(model.denoiser(x, sigma) - data.denoiser(x, sigma)))) > 1e-3
            np.testing.assert_allclose(guided(x, sigma), data.denoiser(x, sigma), rtol=1e-9, atol=1e-10)
        # so every sampler run on the guided model is the sampler run on the data model
        sigmas = schedules.get('edm', num_steps=8, sigma_min=0.002, sigma_max=20.0).astype(jnp.float64)
        x_T = _x(sigma=20.0)
        for name in ('heun', 'dpmpp_2m', 'dpm2'):
            sampler = samplers.get(name)
            np.testing.assert_allclose(sampler(guided, x_T, sigmas)[0], sampler(data.denoiser, x_T, sigmas)[0],
                                       rtol=1e-7, atol=1e-8)
        both = guidance.guided_heun(first_evaluation_only=False)
        np.testing.assert_allclose(both(guided, x_T, sigmas)[0], samplers.get('heun')(data.denoiser, x_T, sigmas)[0],
                                   rtol=1e-7, atol=1e-8)


def test_weight_zero_is_the_unguided_sampler_exactly():
    data, model, log_ratio = _mixtures(jnp.float32)
    off = guidance.discriminator_guided(model.denoiser, log_ratio, weight=0.0)
    sigmas = schedules.get('edm', num_steps=6, sigma_min=0.002, sigma_max=20.0)
    x_T = _x(sigma=20.0, dtype=jnp.float32)
    key = jax.random.PRNGKey(3)
    for name, options in (('euler', {}), ('heun', {}), ('heun', {'s_churn': 10.0}), ('dpmpp_2m', {}), ('ipndm', {})):
        sampler = samplers.get(name, **options)
        np.testing.assert_array_equal(sampler(off, x_T, sigmas, key=key)[0],
                                      sampler(model.denoiser, x_T, sigmas, key=key)[0])
    for options in ({}, {'s_churn': 10.0, 's_min': 0.05, 's_max': 10.0, 's_noise': 1.007}):
        ours = guidance.guided_heun(**options)
        x0, info = ours(off, x_T, sigmas, key=key)
        np.testing.assert_array_equal(x0, ours(model.denoiser, x_T, sigmas, key=key)[0])
        assert int(info['guidance_calls']) == 0
        reference, reference_info = samplers.get('heun', **options)(model.denoiser, x_T, sigmas, key=key)
        np.testing.assert_allclose(x0, reference, rtol=1e-6, atol=1e-6)
        assert info['nfe'] == reference_info['nfe'] == 11


def test_the_window_is_per_example():
    with jax.enable_x64(True):
        _, model, log_ratio = _mixtures()
        guided = guidance.discriminator_guided(model.denoiser, log_ratio, weight=1.0, sigma_min=0.05, sigma_max=5.0)
        x = _x(n=4)
        sigma = jnp.array([0.01, 0.05, 5.0, 6.0])
        changed = jnp.any(guided(x, sigma) != model.denoiser(x, sigma), axis=1)
        assert changed.tolist() == [False, True, True, False]
        np.testing.assert_array_equal(guided(x, 0.01), model.denoiser(x, 0.01))
        with pytest.raises(ValueError, match='sigma_min'):
            guidance.discriminator_guided(model.denoiser, log_ratio, sigma_min=2.0, sigma_max=1.0)


def _reference_heun(model, log_ratio, x, sigmas, weight, window, key=None, boosting=False, s_churn=0.0):
    """The DG authors' EDM-G++ `edm_sampler` transcribed step by step (Python loop, eager): churn vectors, the
    guidance on the first evaluation only (d_cur += w * (-t_hat^2 grad log r) / t_hat), boosting every 5 / 2 steps."""
    num_steps = len(sigmas) - 1
    batch = x.shape[0]
    grad = jax.grad(lambda x, sigma: jnp.sum(log_ratio(x, sigma)))
    ratio = jnp.full((batch,), jnp.inf)
    for i in range(num_steps):
        t, t_next = sigmas[i], sigmas[i + 1]
        churn, noise = jnp.full((batch,), s_churn), jnp.ones((batch,))
        if boosting and i % 5 == 0:
            churn = jnp.where(ratio < 0, 4.0, churn)
        gamma = jnp.minimum(churn / num_steps, math.sqrt(2) - 1)
        t_hat = t + gamma * t
        if key is not None:
            x = x + jnp.sqrt(t_hat ** 2 - t ** 2)[:, None] * noise[:, None] * common.step_noise(key, i, x.shape, x.dtype)
        d_cur = (x - model.denoiser(x, t_hat)) / t_hat[:, None]
        if window[0] <= float(t_hat.min()) <= window[1]:
            guidance_score = -(t_hat[:, None] ** 2) * grad(x, t_hat)
            ratio = log_ratio(x, t_hat)
            if boosting and i % 2 == 0:
                guidance_score = jnp.where(ratio[:, None] < 0, 2 * guidance_score, guidance_score)
            d_cur = d_cur + weight * guidance_score / t_hat[:, None]
        else:
            ratio = jnp.full((batch,), 1e7)
        x_next = x + (t_next - t_hat)[:, None] * d_cur
        if i < num_steps - 1:
            d_prime = (x_next - model.denoiser(x_next, t_next)) / t_next
            x_next = x + (t_next - t_hat)[:, None] * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next
    return x


def test_first_evaluation_only_is_the_authors_sampler():
    with jax.enable_x64(True):
        _, model, log_ratio = _mixtures()
        sigmas = schedules.get('edm', num_steps=7, sigma_min=0.002, sigma_max=20.0).astype(jnp.float64)
        x_T = _x(sigma=20.0)
        guided = guidance.discriminator_guided(model.denoiser, log_ratio, weight=2.0, sigma_min=0.045)
        x0, info = guidance.guided_heun()(guided, x_T, sigmas)
        want = _reference_heun(model, log_ratio, x_T, sigmas, 2.0, (0.045, np.inf))
        np.testing.assert_allclose(x0, want, rtol=1e-9, atol=1e-10)
        # different from guiding both evaluations, and from the unguided sampler
        assert float(jnp.max(jnp.abs(x0 - guidance.guided_heun(first_evaluation_only=False)(guided, x_T, sigmas)[0]))) > 1e-3
        assert float(jnp.max(jnp.abs(x0 - samplers.get('heun')(model.denoiser, x_T, sigmas)[0]))) > 1e-3
        assert info['nfe'] == 13


@pytest.mark.parametrize('s_churn', [0.0, 3.0])
def test_boosting_is_the_authors_sampler(s_churn):
    with jax.enable_x64(True):
        _, model, log_ratio = _mixtures()
        sigmas = schedules.get('edm', num_steps=12, sigma_min=0.002, sigma_max=20.0).astype(jnp.float64)
        x_T = _x(n=16, sigma=20.0)
        key = jax.random.PRNGKey(4)
        guided = guidance.discriminator_guided(model.denoiser, log_ratio, weight=1.0)
        x0, _ = guidance.guided_heun(boosting=True, s_churn=s_churn)(guided, x_T, sigmas, key=key)
        want = _reference_heun(model, log_ratio, x_T, sigmas, 1.0, (0.0, np.inf), key=key, boosting=True,
                               s_churn=s_churn)
        np.testing.assert_allclose(x0, want, rtol=1e-8, atol=1e-9)
        plain, _ = guidance.guided_heun(s_churn=s_churn)(guided, x_T, sigmas, key=key)
        assert float(jnp.max(jnp.abs(x0 - plain))) > 1e-3                 # boosting did something here
        with pytest.raises(ValueError, match='boosting'):
            guidance.guided_heun(boosting=True)(model.denoiser, x_T, sigmas, key=key)


def test_guidance_calls_are_counted_beside_nfe():
    _, model, log_ratio = _mixtures(jnp.float32)
    sigmas = schedules.get('edm', num_steps=6, sigma_min=0.002, sigma_max=20.0)
    s = np.asarray(sigmas)
    window = (0.1, 5.0)
    inside = lambda values: int(np.sum((values >= window[0]) & (values <= window[1])))
    guided = guidance.discriminator_guided(model.denoiser, log_ratio, weight=1.0, sigma_min=window[0],
                                           sigma_max=window[1])
    x_T = _x(sigma=20.0, dtype=jnp.float32)
    first, second = s[:-1], s[1:-1]                              # Heun: first evaluations, second ones (t_next > 0)
    x0, info = guidance.guided_heun()(guided, x_T, sigmas)
    assert 0 < inside(first) < len(first) and 0 < inside(second)                 # a window that matters
    assert int(info['guidance_calls']) == inside(first) and info['nfe'] == 11
    _, info_both = guidance.guided_heun(first_evaluation_only=False)(guided, x_T, sigmas)
    assert int(info_both['guidance_calls']) == inside(first) + inside(second)
    # any sampler: the gradient evaluations that really ran
    _, counted = guidance.count_guidance_calls(samplers.get('heun'), guided, x_T, sigmas)
    assert counted['guidance_calls'] == inside(first) + inside(second) and counted['nfe'] == 11
    _, counted = guidance.count_guidance_calls(samplers.get('dpmpp_2m'), guided, x_T, sigmas)
    assert counted['guidance_calls'] == inside(first)
    x0_counted, counted = guidance.count_guidance_calls(guidance.guided_heun(), guided, x_T, sigmas)
    assert counted['guidance_calls'] == int(info['guidance_calls'])
    np.testing.assert_array_equal(x0_counted, x0)
    everywhere = guidance.discriminator_guided(model.denoiser, log_ratio, weight=1.0)
    assert guidance.count_guidance_calls(samplers.get('heun'), everywhere, x_T, sigmas)[1]['guidance_calls'] == 11


def test_with_aux_passes_the_unguided_aux_through():
    _, model, log_ratio = _mixtures(jnp.float32)

    class WithAux:
        def __call__(self, x, sigma):
            return model.denoiser(x, sigma)

        def with_aux(self, x, sigma):
            return model.denoiser(x, sigma), {'bottleneck': x[:, :1]}

    x = _x(n=4, dtype=jnp.float32)
    guided = guidance.discriminator_guided(WithAux(), log_ratio, weight=1.0)
    x0_hat, aux = common.call_denoiser(guided, x, 1.0, with_aux=True)
    np.testing.assert_allclose(x0_hat, guided(x, 1.0))
    np.testing.assert_array_equal(aux['bottleneck'], x[:, :1])
    assert common.call_denoiser(guidance.discriminator_guided(model.denoiser, log_ratio), x, 1.0,
                                with_aux=True)[1] == {}


def test_clipped_log_ratio_is_the_clipped_discriminator():
    with jax.enable_x64(True):
        logit = jnp.array([-30.0, -3.0, 0.0, 2.5, 30.0], jnp.float64)
        d = jnp.clip(jax.nn.sigmoid(logit), 1e-5, 1 - 1e-5)
        np.testing.assert_allclose(guidance.clipped_log_ratio(logit), jnp.log(d / (1 - d)), rtol=1e-9, atol=1e-12)
    assert float(jax.grad(lambda l: guidance.clipped_log_ratio(l))(30.0)) == 0.0
