"""GMM-DDIM (Gabbur, arXiv 2311.04938): reduction to DDIM, the moment-matching theorem, the offsets' constraints, the
sigma-space mapping of the paper's alpha-bar kernel, clipping, and NFE, against exact denoisers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.core import analytic, samplers, schedules
from jaxdiff.core.samplers import gmm_ddim as G

SHAPE = (4, 4, 3)


def _mixture():
    rng = np.random.default_rng(0)
    return analytic.GaussianMixture(jnp.asarray(rng.normal(size=(3,) + SHAPE), jnp.float32),
                                    jnp.asarray([0.2, 0.3, 0.1], jnp.float32), jnp.asarray([0.5, 0.3, 0.2], jnp.float32))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _x_T(sigma_max, batch=16, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch,) + SHAPE) * sigma_max, jnp.float32)


def test_scale_zero_equals_ddim_and_small_scale_is_close():
    gmm, sigmas = _mixture(), schedules.get('edm', num_steps=6)
    x_T, key = _x_T(float(sigmas[0])), jax.random.key(7)
    for eta in (0.0, 1.0):
        ref, ref_info = samplers.get('ddim', eta=eta)(gmm.denoiser, x_T, sigmas, key=key)
        out, info = samplers.get('gmm_ddim', eta=eta, scale=0.0)(gmm.denoiser, x_T, sigmas, key=key)
        assert _rel(out, ref) < 1e-6 and info['nfe'] == ref_info['nfe']
    # a tiny scale runs the whole offset path (offsets, component choice, covariance offsets) and must keep
    # ddim's z: a different key derivation or noise draw would show as an O(1) difference
    # (each variant once, the two covariance forms alternating, to keep compile time down)
    ref, _ = samplers.get('ddim', eta=0.5)(gmm.denoiser, x_T, sigmas, key=key)
    for variant, covariance in zip(G.VARIANTS, G.COVARIANCES * 2):
        out, _ = samplers.get('gmm_ddim', eta=0.5, variant=variant, scale=1e-5, num_components=4,
                              covariance=covariance)(gmm.denoiser, x_T, sigmas, key=key)
        assert _rel(out, ref) < 1e-4, (variant, covariance)


def test_offsets_are_centred_and_ortho_directions_orthonormal():
    pi = jnp.asarray([0.1, 0.2, 0.3, 0.4])
    for variant in G.VARIANTS:
        off = G.draw_offsets(jax.random.key(0), variant=variant, num_sets=3, dim=48, num_components=4,
                             weights=pi, scale=2.5)
        assert off.delta.shape == (3, 4, 48)
        np.testing.assert_allclose(np.einsum('k,skd->sd', pi, off.delta), 0.0, atol=1e-5)     # sum_k pi_k delta_k
        u = np.asarray(off.directions)
        gram = np.einsum('skd,sld->skl', u, u)
        if variant == 'rand':
            np.testing.assert_allclose(np.diagonal(gram, axis1=1, axis2=2), 1.0, rtol=1e-5)
            assert np.abs(gram - np.eye(4)).max() > 1e-2          # random unit columns, not orthogonalised
        else:                                                      # orthonormal before centring (Eq. 10)
            np.testing.assert_allclose(gram, np.broadcast_to(np.eye(4), gram.shape), atol=1e-5)
        # the sets differ from step to step
        assert np.abs(u[0] - u[1]).max() > 1e-2


def test_vub_bounds_bound_the_shared_covariance_offset():
    """Eq. 12: for orthonormal u, every eigenvalue of Delta_k = (1/(K pi_k)) sum_l pi_l delta_l delta_l^T is at most
    lambda_k = s^2 max(pi) / (K pi_k), with equality for uniform pi."""
    for pi in (jnp.full((5,), 0.2), jnp.asarray([0.1, 0.15, 0.2, 0.25, 0.3])):
        off = G.draw_offsets(jax.random.key(1), variant='ortho', num_sets=1, dim=40, num_components=5,
                             weights=pi, scale=1.7, covariance='exact')
        bounds = np.asarray(G.vub_bounds(pi, 1.7))
        top = np.asarray(off.eigvals[0]).max(axis=1)
        assert np.all(top <= bounds * (1 + 1e-5))
        if np.allclose(pi, 0.2):
            np.testing.assert_allclose(top, bounds, rtol=1e-4)


@pytest.mark.parametrize('variant,delta_form', [('ortho', 'shared'), ('rand', 'component')])
def test_one_step_matches_ddpm_marginal_moments(variant, delta_form):
    """The moment-matching theorem: from x_t ~ q(x_t | x0) and a denoiser returning that x0, one GMM-DDIM step with
    eta > 0 and exact Delta gives x_s with DDPM's marginal mean x0 and covariance sigma_s^2 I (sigma-space).
    The diagonal form misses the off-diagonal part of sum_k pi_k delta_k delta_k^T, which shows that the check bites."""
    dim, n = 6, 200_000
    x0 = jnp.asarray(np.linspace(-1.0, 1.0, dim), jnp.float32)
    sigmas = jnp.asarray([2.0, 1.0, 0.0], jnp.float32)     # step 0 gets offsets (the last step does not)
    eps = jax.random.normal(jax.random.key(11), (n, dim))
    x_t = x0 + sigmas[0] * eps
    denoiser = lambda x, sigma: jnp.broadcast_to(x0, x.shape)
    weights = (0.5, 0.3, 0.2)
    errors = {}
    for covariance in ('exact', 'diagonal'):
        sampler = samplers.get('gmm_ddim', eta=1.0, variant=variant, num_components=3, weights=weights, scale=0.55,
                               delta_form=delta_form, covariance=covariance, offsets_seed=5)
        _, info = sampler(denoiser, x_t, sigmas, key=jax.random.key(3), return_trajectory=True)
        x_s = np.asarray(info['trajectory'][1], np.float64)
        mean_err = np.abs(x_s.mean(0) - np.asarray(x0)).max()
        cov_err = np.abs(np.cov(x_s.T) - float(sigmas[1]) ** 2 * np.eye(dim)).max()
        errors[covariance] = (mean_err, cov_err)
    # standard errors: mean 1/sqrt(n) ~ 0.0022, covariance entry ~ sqrt(2/n) ~ 0.0032; allow ~5 of them
    mean_err, cov_err = errors['exact']
    assert mean_err < 0.012 and cov_err < 0.016, errors
    # the same step with the offsets removed from the covariance budget would be off by c_s^2 * sum pi delta delta^T
    assert errors['diagonal'][1] > 3 * 0.016, errors


def _alpha_bar_reference(denoiser, x_T, sigmas, eta, offsets, k_of_step, z_of_step, last_step_offsets=False):
    """The paper's kernel (Eq. 7, diagonal covariance) run in alpha-bar space in float64, mapped back to sigma-space:
    x_abar = x_sigma / sqrt(1 + sigma^2)."""
    x_sigma = np.asarray(x_T, np.float64)
    batch = x_sigma.shape[0]
    sigmas = np.asarray(sigmas, np.float64)
    for i in range(len(sigmas) - 1):
        t, s = sigmas[i], sigmas[i + 1]
        abar_t, abar_s = 1 / (1 + t ** 2), 1 / (1 + s ** 2)
        x_abar = x_sigma * np.sqrt(abar_t)
        x0_hat = np.asarray(denoiser(jnp.asarray(x_sigma, jnp.float32), jnp.float32(t)), np.float64)
        eps_hat = (x_abar - np.sqrt(abar_t) * x0_hat) / np.sqrt(1 - abar_t)
        sigma_p = eta * np.sqrt((1 - abar_s) / (1 - abar_t)) * np.sqrt(1 - abar_t / abar_s)
        gate = 1.0 if (last_step_offsets or i < len(sigmas) - 2) else 0.0
        k = np.asarray(k_of_step(i))
        delta = np.asarray(offsets.delta[i], np.float64)[k].reshape(x_sigma.shape)
        var = np.asarray(offsets.variance[i], np.float64)[k].reshape(x_sigma.shape)
        z = np.asarray(z_of_step(i), np.float64)
        x_abar_s = (np.sqrt(abar_s) * x0_hat + np.sqrt(1 - abar_s - sigma_p ** 2) * eps_hat + gate * delta
                    + np.sqrt(np.maximum(sigma_p ** 2 - gate * var, 0.0)) * z)
        x_sigma = x_abar_s / np.sqrt(abar_s)
    assert batch == x_sigma.shape[0]
    return x_sigma


@pytest.mark.parametrize('variant', ['ortho', 'ortho_vub'])
def test_sigma_space_sampler_equals_paper_kernel_in_alpha_bar_space(variant):
    """On the DDPM grid, the sigma-space sampler equals Eq. 7 run in alpha-bar space (offsets scaled by
    sqrt(1 + sigma_s^2) in sigma-space, so `scale` means the paper's s), with the same offsets, components and z."""
    gmm, sigmas = _mixture(), schedules.get('ddpm', num_steps=5)
    x_T, key, eta, scale, K = _x_T(float(sigmas[0]), batch=8), jax.random.key(4), 0.5, 3.0, 4
    out, _ = samplers.get('gmm_ddim', eta=eta, variant=variant, num_components=K, scale=scale)(
        gmm.denoiser, x_T, sigmas, key=key)
    weights = jnp.full((K,), 1.0 / K)
    offsets = G.draw_offsets(jax.random.fold_in(key, G.OFFSETS_STREAM), variant=variant, num_sets=5,
                             dim=int(np.prod(SHAPE)), num_components=K, weights=weights, scale=scale)
    ref = _alpha_bar_reference(gmm.denoiser, x_T, sigmas, eta, offsets,
                               lambda i: G.component_choice(key, i, weights, 8),
                               lambda i: jax.random.normal(jax.random.fold_in(key, i), x_T.shape))
    assert _rel(out, ref) < 1e-4
    # without the sqrt(1 + sigma_s^2) factor the answer would differ visibly
    ddim_out, _ = samplers.get('ddim', eta=eta)(gmm.denoiser, x_T, sigmas, key=key)
    assert _rel(out, ddim_out) > 1e-2


def test_eta_zero_is_stochastic_through_offsets_only_and_last_step_is_ddim():
    gmm, sigmas = _mixture(), schedules.get('edm', num_steps=5)
    x_T = _x_T(float(sigmas[0]))
    sampler = samplers.get('gmm_ddim', eta=0.0, variant='ortho', num_components=4, scale=1.0)
    a, info = sampler(gmm.denoiser, x_T, sigmas, key=jax.random.key(0), return_trajectory=True)
    b, _ = sampler(gmm.denoiser, x_T, sigmas, key=jax.random.key(1))
    assert _rel(a, b) > 1e-3
    # step 0 from the same x_T: GMM-DDIM(eta=0) - DDIM(eta=0) = c_s delta_k, one of the K offsets per sample
    traj = info['trajectory']
    ddim_step0 = samplers.get('ddim')(gmm.denoiser, x_T, sigmas[:2])[0]
    diff = np.asarray(traj[1] - ddim_step0).reshape(x_T.shape[0], -1)
    offsets = G.draw_offsets(jax.random.fold_in(jax.random.key(0), G.OFFSETS_STREAM), variant='ortho',
                             num_sets=5, dim=diff.shape[1], num_components=4, weights=jnp.full((4,), 0.25), scale=1.0)
    k = np.asarray(G.component_choice(jax.random.key(0), 0, jnp.full((4,), 0.25), x_T.shape[0]))
    c_s = np.sqrt(1 + float(sigmas[1]) ** 2)
    np.testing.assert_allclose(diff, c_s * np.asarray(offsets.delta[0])[k], rtol=1e-3, atol=1e-3 * c_s)
    # the last step (into sigma = 0) is plain DDIM by default: x0 = D(x, sigma_{N-1})
    np.testing.assert_allclose(a, gmm.denoiser(traj[-2], sigmas[-2]), rtol=1e-5, atol=1e-5)
    c, _ = samplers.get('gmm_ddim', eta=0.0, num_components=4, scale=1.0, last_step_offsets=True)(
        gmm.denoiser, x_T, sigmas, key=jax.random.key(0))
    assert _rel(c, a) > 1e-3


def test_negative_variances_are_clipped_never_nan():
    sigma_up, c_s = jnp.float32(0.3), jnp.float32(2.0)
    std = G.diagonal_std(sigma_up, c_s, jnp.asarray([0.0, 0.01, 1.0, 100.0]))
    np.testing.assert_allclose(std, [0.3, np.sqrt(0.09 - 0.04), 0.0, 0.0], rtol=1e-5)
    # exact form: along the clipped eigen-direction the noise vanishes, elsewhere it keeps sigma_up
    basis = jnp.eye(5, 2)
    eigvecs = jnp.broadcast_to(jnp.eye(2), (3, 2, 2))
    eigvals = jnp.broadcast_to(jnp.asarray([10.0, 0.0]), (3, 2))
    z = jax.random.normal(jax.random.key(0), (3, 5))
    noise = np.asarray(G.exact_noise(z, sigma_up, c_s, basis, eigvecs, eigvals))
    np.testing.assert_allclose(noise[:, 0], 0.0, atol=1e-7)
    np.testing.assert_allclose(noise[:, 1:], 0.3 * np.asarray(z)[:, 1:], rtol=1e-5)
    # a huge scale on the whole sampler: every variance is clipped, the output is finite
    gmm, sigmas = _mixture(), schedules.get('ddpm', num_steps=4)
    x_T = _x_T(float(sigmas[0]), batch=4)
    for variant, covariance in zip(G.VARIANTS, G.COVARIANCES[::-1] * 2):
        out, _ = samplers.get('gmm_ddim', eta=1.0, variant=variant, num_components=4, scale=1e3,
                              covariance=covariance)(gmm.denoiser, x_T, sigmas, key=jax.random.key(2))
        assert np.all(np.isfinite(np.asarray(out))), (variant, covariance)


def test_nfe_equals_ddim_and_counted_calls():
    gmm, sigmas = _mixture(), schedules.get('ddpm', num_steps=3)
    x_T = _x_T(float(sigmas[0]), batch=2)
    calls = {'n': 0}

    def counting(x, sigma):
        calls['n'] += 1
        return gmm.denoiser(x, sigma)

    counts = {}
    for name, options in (('ddim', {'eta': 0.5}),
                          ('gmm_ddim', {'eta': 0.0, 'variant': 'vub_star', 'num_components': 4, 'covariance': 'exact'})):
        calls['n'] = 0
        with jax.disable_jit():
            _, info = samplers.get(name, **options)(counting, x_T, sigmas, key=jax.random.key(0))
        assert int(info['nfe']) == calls['n'], (name, options)
        counts[(name, tuple(options.items()))] = calls['n']
    assert set(counts.values()) == {3}


def test_bad_options_are_one_line_value_errors():
    for options in ({'variant': 'nope'}, {'num_components': 1}, {'scale': -1.0}, {'eta': 1.5},
                    {'weights': [0.5, 0.5], 'num_components': 4}, {'weights': [1.5, -0.5]}, {'weights': [1.0]},
                    {'covariance': 'full'}, {'delta_form': 'x'}):
        with pytest.raises(ValueError):
            samplers.get('gmm_ddim', **options)
    sampler = samplers.get('gmm_ddim', num_components=8, variant='ortho')
    with pytest.raises(ValueError, match='num_components <= data dimension'):
        sampler(lambda x, s: x, jnp.zeros((2, 3)), jnp.asarray([1.0, 0.0]), key=jax.random.key(0))
    with pytest.raises(ValueError, match='key'):
        sampler(lambda x, s: x, jnp.zeros((2, 16)), jnp.asarray([1.0, 0.0]))


def test_benchmark_writes_rows_and_shares_random_numbers(tmp_path, capsys):
    """A tiny run of the GMM-DDIM benchmark: CSV rows for every (problem, method, eta, steps, seed) plus the
    exact-sample floor, NFE = steps, finite metrics, a PNG; with scale = 0 the GMM rows equal DDIM's (common random
    numbers)."""
    import csv
    from jaxdiff.drivers import config_files
    from jaxdiff.bench import gmm_ddim as bench_gmm_ddim
    config = config_files.named('bench_gmm_ddim')
    config.gmm_ddim.num_components = 4
    config.gmm_ddim.scale = 0.0
    config.bench.update(methods=('ddim', 'ortho'), steps=(3,), etas=(0.5,), num_seeds=2, num_samples=64,
                        num_projections=16)
    config.bench.problem_options.separated_mixture.shape = (2, 2, 3)
    bench_gmm_ddim.run(config, str(tmp_path))
    with open(tmp_path / 'bench_gmm_ddim.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * (2 + 2 * 2)                      # datasets x (floor seeds + methods x seeds)
    assert (tmp_path / 'bench_gmm_ddim.png').stat().st_size > 0
    for row in rows:
        assert all(np.isfinite(float(row[m])) for m in bench_gmm_ddim.METRICS)
        assert row['method'] == 'exact' or int(row['nfe']) == 3
    by_key = {(r['dataset'], r['method'], r['seed']): r for r in rows}
    for dataset in ('separated_mixture', 'digits'):
        for seed in ('0', '1'):
            for m in bench_gmm_ddim.METRICS:
                assert by_key[(dataset, 'ortho', seed)][m] == by_key[(dataset, 'ddim', seed)][m]
    assert 'separated_mixture fd' in capsys.readouterr().out
