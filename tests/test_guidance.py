"""Discriminator guidance (jaxdiff.core.guidance) on exact ground truth: the exact log density ratio of two Gaussian
mixtures, finite-difference gradients, transcriptions of the authors' EDM-G++ sampler ('heun_dg'), counted network
and gradient evaluations (under jit, vmap and pmap)."""
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
    return jax.random.normal(jax.random.key(seed), (n, d), dtype) * sigma


def test_guidance_term_equals_a_finite_difference_gradient_of_the_logit():
    with jax.enable_x64(True):
        A = jax.random.normal(jax.random.key(0), (4, 6), jnp.float64)
        b = jax.random.normal(jax.random.key(1), (6,), jnp.float64)
        logit = lambda x, sigma: jnp.tanh(x @ A) @ b * jnp.log1p(sigma) + 0.1 * jnp.sum(x ** 2, -1) / sigma
        denoiser = lambda x, sigma: 0.5 * x
        sigma = jnp.array([0.05, 0.7, 3.0])
        x = jax.random.normal(jax.random.key(2), (3, 4), jnp.float64)
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
        both = samplers.get('heun_dg', first_evaluation_only=False)
        np.testing.assert_allclose(both(guided, x_T, sigmas)[0], samplers.get('heun')(data.denoiser, x_T, sigmas)[0],
                                   rtol=1e-7, atol=1e-8)


def test_weight_zero_is_the_unguided_sampler_exactly():
    data, model, log_ratio = _mixtures(jnp.float32)
    off = guidance.discriminator_guided(model.denoiser, log_ratio, weight=0.0)
    sigmas = schedules.get('edm', num_steps=6, sigma_min=0.002, sigma_max=20.0)
    x_T = _x(sigma=20.0, dtype=jnp.float32)
    key = jax.random.key(3)
    for name, options in (('euler', {}), ('heun', {}), ('heun', {'s_churn': 10.0}), ('dpmpp_2m', {}), ('ipndm', {})):
        sampler = samplers.get(name, **options)
        np.testing.assert_array_equal(sampler(off, x_T, sigmas, key=key)[0],
                                      sampler(model.denoiser, x_T, sigmas, key=key)[0])
    for options in ({}, {'s_churn': 10.0, 's_min': 0.05, 's_max': 10.0, 's_noise': 1.007}):
        ours = samplers.get('heun_dg', **options)
        x0, info = ours(off, x_T, sigmas, key=key)
        np.testing.assert_array_equal(x0, ours(model.denoiser, x_T, sigmas, key=key)[0])
        assert int(info['gradient_evaluations']) == 0
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
        x0, info = samplers.get('heun_dg')(guided, x_T, sigmas)
        want = _reference_heun(model, log_ratio, x_T, sigmas, 2.0, (0.045, np.inf))
        np.testing.assert_allclose(x0, want, rtol=1e-9, atol=1e-10)
        # different from guiding both evaluations, and from the unguided sampler
        both = samplers.get('heun_dg', first_evaluation_only=False)
        assert float(jnp.max(jnp.abs(x0 - both(guided, x_T, sigmas)[0]))) > 1e-3
        assert float(jnp.max(jnp.abs(x0 - samplers.get('heun')(model.denoiser, x_T, sigmas)[0]))) > 1e-3
        assert info['nfe'] == 13


@pytest.mark.parametrize('s_churn', [0.0, 3.0])
def test_boosting_is_the_authors_sampler(s_churn):
    with jax.enable_x64(True):
        _, model, log_ratio = _mixtures()
        sigmas = schedules.get('edm', num_steps=12, sigma_min=0.002, sigma_max=20.0).astype(jnp.float64)
        x_T = _x(n=16, sigma=20.0)
        key = jax.random.key(4)
        guided = guidance.discriminator_guided(model.denoiser, log_ratio, weight=1.0)
        x0, _ = samplers.get('heun_dg', boosting=True, s_churn=s_churn)(guided, x_T, sigmas, key=key)
        want = _reference_heun(model, log_ratio, x_T, sigmas, 1.0, (0.0, np.inf), key=key, boosting=True,
                               s_churn=s_churn)
        np.testing.assert_allclose(x0, want, rtol=1e-8, atol=1e-9)
        plain, _ = samplers.get('heun_dg', s_churn=s_churn)(guided, x_T, sigmas, key=key)
        assert float(jnp.max(jnp.abs(x0 - plain))) > 1e-3                 # boosting did something here
        with pytest.raises(ValueError, match='boosting'):
            samplers.get('heun_dg', boosting=True)(model.denoiser, x_T, sigmas, key=key)


def test_gradient_evaluations_are_counted_beside_nfe():
    _, model, log_ratio = _mixtures(jnp.float32)
    sigmas = schedules.get('edm', num_steps=6, sigma_min=0.002, sigma_max=20.0)
    s = np.asarray(sigmas)
    window = (0.1, 5.0)
    inside = lambda values: int(np.sum((values >= window[0]) & (values <= window[1])))
    guided = guidance.discriminator_guided(model.denoiser, log_ratio, weight=1.0, sigma_min=window[0],
                                           sigma_max=window[1])
    x_T = _x(sigma=20.0, dtype=jnp.float32)
    first, second = s[:-1], s[1:-1]                              # Heun: first evaluations, second ones (t_next > 0)
    x0, info = samplers.get('heun_dg')(guided, x_T, sigmas)
    assert 0 < inside(first) < len(first) and 0 < inside(second)                 # a window that matters
    assert int(info['gradient_evaluations']) == inside(first) and info['nfe'] == 11
    _, info_both = samplers.get('heun_dg', first_evaluation_only=False)(guided, x_T, sigmas)
    assert int(info_both['gradient_evaluations']) == inside(first) + inside(second)
    # any sampler: the gradient evaluations its denoiser declares, counted in the run
    _, counted = samplers.get('heun')(guided, x_T, sigmas)
    assert int(counted['gradient_evaluations']) == inside(first) + inside(second) and counted['nfe'] == 11
    _, counted = samplers.get('dpmpp_2m')(guided, x_T, sigmas)
    assert int(counted['gradient_evaluations']) == inside(first)
    # the counters are the evaluations that really ran: a logit_fn that counts its own eager calls agrees
    calls = {'n': 0}

    def counting_log_ratio(x, sigma):
        calls['n'] += 1
        return log_ratio(x, sigma)

    counting = guidance.discriminator_guided(model.denoiser, counting_log_ratio, weight=1.0, sigma_min=window[0],
                                             sigma_max=window[1])
    with jax.disable_jit():
        x0_counted, counted = samplers.get('heun_dg')(counting, x_T, sigmas)
    assert calls['n'] == int(counted['gradient_evaluations']) == int(info['gradient_evaluations'])
    np.testing.assert_allclose(x0_counted, x0, rtol=1e-5, atol=1e-5)
    everywhere = guidance.discriminator_guided(model.denoiser, log_ratio, weight=1.0)
    assert int(samplers.get('heun')(everywhere, x_T, sigmas)[1]['gradient_evaluations']) == 11


COUNTED = [('heun', {}), ('heun_dg', {}), ('heun_dg', {'first_evaluation_only': False}),
           ('heun_dg', {'boosting': True}), ('heun_dg', {'boosting': True, 's_churn': 3.0}), ('dpmpp_2m', {}),
           ('amed', {}), ('amed', {'base': 'dpmpp_2m', 'afs': True})]


@pytest.mark.parametrize('name, options', COUNTED)
def test_network_and_gradient_evaluations_are_the_calls_made(name, options):
    """A GuidedDenoiser whose window covers part of the grid: info's counters equal the denoiser and logit_fn calls
    that really ran (Python counters, jit disabled), and the jitted run counts the same."""
    _, model, log_ratio = _mixtures(jnp.float32)
    calls = {'network': 0, 'gradient': 0}

    def network(x, sigma):
        calls['network'] += 1
        return model.denoiser(x, sigma)

    def logit_fn(x, sigma):
        calls['gradient'] += 1
        return log_ratio(x, sigma)

    guided = guidance.discriminator_guided(network, logit_fn, weight=1.0, sigma_min=0.1, sigma_max=5.0)
    sigmas = schedules.get('edm', num_steps=7, sigma_min=0.002, sigma_max=20.0)
    x_T, key = _x(sigma=20.0, dtype=jnp.float32), jax.random.key(3)
    sampler = samplers.get(name, **options)
    with jax.disable_jit():
        _, info = sampler(guided, x_T, sigmas, key=key)
    made = dict(calls)                                            # (tracing below calls them once more)
    assert 0 < made['gradient'] < made['network']                                     # the window matters
    assert int(info['network_evaluations']) == made['network'] == info['nfe']
    assert int(info['gradient_evaluations']) == made['gradient']
    jitted = jax.jit(lambda x: sampler(guided, x, sigmas, key=key)[1])(x_T)
    assert int(jitted['network_evaluations']) == made['network']
    assert int(jitted['gradient_evaluations']) == made['gradient']


@pytest.mark.parametrize('name, options', [('heun_dg', {'boosting': True}), ('heun', {}), ('amed', {})])
def test_evaluations_are_counted_under_pmap_and_vmap(name, options):
    """8 devices (pmap) and vmap, each with its own grid (sigma_max 1.5 .. 20, so the window [0.1, 5] covers a
    different number of grid points on each): every device's counters equal its own single run's."""
    _, model, log_ratio = _mixtures(jnp.float32)
    guided = guidance.discriminator_guided(model.denoiser, log_ratio, weight=1.0, sigma_min=0.1, sigma_max=5.0)
    sampler = samplers.get(name, **options)
    grids = jnp.stack([schedules.get('edm', num_steps=5, sigma_min=0.002, sigma_max=float(sigma_max))
                       for sigma_max in np.geomspace(1.5, 20.0, 8)])
    x_T = _x(n=16, sigma=1.0, dtype=jnp.float32).reshape(8, 2, 3) * grids[:, :1, None]
    key = jax.random.key(5)

    def run(x, sigmas):
        x0, info = sampler(guided, x, sigmas, key=key)
        return x0, info['nfe'], info['network_evaluations'], info['gradient_evaluations']

    single = [run(x_T[d], grids[d]) for d in range(8)]
    gradients = [int(counts[3]) for counts in single]
    assert len(set(gradients)) > 1                                                   # the devices differ
    for mapped in (jax.pmap(run, devices=jax.devices()[:8])(x_T, grids), jax.vmap(run)(x_T, grids)):
        x0, nfe, network, gradient = (np.asarray(a) for a in mapped)
        for d, (x0_d, nfe_d, network_d, gradient_d) in enumerate(single):
            assert nfe[d] == nfe_d == network[d] == int(network_d) == 9
            assert gradient[d] == int(gradient_d)
            np.testing.assert_allclose(x0[d], x0_d, rtol=2e-5, atol=2e-5)


def test_transforms_add_their_evaluations_to_the_wrapped_ones():
    """A transform declaring two network evaluations per call (as classifier-free guidance will), guided by a
    discriminator: every call costs its 2 network evaluations plus the discriminator's gradient inside the window."""
    _, model, log_ratio = _mixtures(jnp.float32)

    class Twice(guidance.Transform):
        def __call__(self, x, sigma):
            return 0.5 * (self.denoiser(x, sigma) + self.denoiser(x, sigma))

        def evaluations(self, x, sigma):
            return 2, 0

    guided = guidance.discriminator_guided(Twice(model.denoiser), log_ratio, weight=1.0, sigma_min=0.1,
                                           sigma_max=5.0)
    sigmas = schedules.get('edm', num_steps=6, sigma_min=0.002, sigma_max=20.0)
    s = np.asarray(sigmas)
    x0, info = samplers.get('heun')(guided, _x(sigma=20.0, dtype=jnp.float32), sigmas)
    inside = int(np.sum((s[:-1] >= 0.1) & (s[:-1] <= 5.0)) + np.sum((s[1:-1] >= 0.1) & (s[1:-1] <= 5.0)))
    assert int(info['network_evaluations']) == 2 * info['nfe'] == 22
    assert int(info['gradient_evaluations']) == inside > 0
    x0_hat, aux = guided.with_aux(_x(n=2, dtype=jnp.float32), 1.0)              # the base passes aux through
    assert aux == {} and x0_hat.shape == (2, 3)


def test_with_aux_passes_the_unguided_aux_through():
    _, model, log_ratio = _mixtures(jnp.float32)

    class WithAux:
        def __call__(self, x, sigma):
            return model.denoiser(x, sigma)

        def with_aux(self, x, sigma):
            return model.denoiser(x, sigma), {'bottleneck': x[:, :1]}

    x = _x(n=4, dtype=jnp.float32)
    guided = guidance.discriminator_guided(WithAux(), log_ratio, weight=1.0)
    x0_hat, aux = common.call_with_aux(guided, x, 1.0)
    np.testing.assert_allclose(x0_hat, guided(x, 1.0))
    np.testing.assert_array_equal(aux['bottleneck'], x[:, :1])
    assert common.call_with_aux(guidance.discriminator_guided(model.denoiser, log_ratio), x, 1.0)[1] == {}


def test_clipped_log_ratio_is_the_clipped_discriminator():
    with jax.enable_x64(True):
        logit = jnp.array([-30.0, -3.0, 0.0, 2.5, 30.0], jnp.float64)
        d = jnp.clip(jax.nn.sigmoid(logit), 1e-5, 1 - 1e-5)
        np.testing.assert_allclose(guidance.clipped_log_ratio(logit), jnp.log(d / (1 - d)), rtol=1e-9, atol=1e-12)
    assert float(jax.grad(lambda l: guidance.clipped_log_ratio(l))(30.0)) == 0.0
