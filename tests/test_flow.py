"""Rectified flow and Fast-ODE (jaxdiff.core.flow, jaxdiff.models.encoder) on exact ground truth: the exact flow velocity of
a Gaussian mixture computed in t-space, closed-form KL against Monte Carlo, finite-difference gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdiff.core import analytic, flow, metrics, precond, samplers
from jaxdiff.models import count_params
from jaxdiff.models.encoder import MLPEncoder, TanhMLP, UNetEncoder

# tiny graphs run once: skipping LLVM optimisation roughly halves their CPU compile time (as tests/test_models.py)
fast_jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def fastode_loss(velocity_fn, encoder_fn, x, key, beta=20.0, t_min=1e-5, prior_var=1.0):
    """The Fast-ODE objective (Sec. 3) written out from flow's pieces, on clean data x [B, ...]: (loss, metrics).

        z = mu + exp(logvar / 2) eps with (mu, logvar) = encoder_fn(x)     (encoder_fn=None: z ~ N(0, diag prior_var),
                                                                            the independent rectified-flow baseline)
        loss_flow  = mean((velocity_fn(x_t, t) - (z - x))^2),  x_t = t z + (1 - t) x,  t ~ U(t_min, 1)
        loss_prior = mean_B KL(q(z | x) || N(0, diag prior_var)) / dim
        loss = loss_flow + beta * loss_prior
    """
    t_key, eps_key = jax.random.split(key)
    eps = jax.random.normal(eps_key, x.shape, x.dtype)
    if encoder_fn is None:
        z = jnp.sqrt(jnp.asarray(prior_var, x.dtype)) * eps
        loss_prior = jnp.zeros((), x.dtype)
    else:
        mu, logvar = encoder_fn(x)
        if mu.shape != x.shape or logvar.shape != x.shape:
            raise ValueError(f'fastode_loss: encoder_fn must return mu and logvar shaped like x {x.shape}, got '
                             f'{mu.shape} and {logvar.shape}')
        z = flow.reparameterize(mu, logvar, eps)
        loss_prior = flow.prior_loss(mu, logvar, prior_var)
    t = flow.sample_t(t_key, x.shape[:1], t_min, x.dtype)
    v = velocity_fn(flow.interpolate(x, z, t), t)
    loss_flow = jnp.mean((v - flow.velocity_target(x, z)) ** 2)
    loss = loss_flow + beta * loss_prior
    return loss, {'loss': loss, 'loss_flow': loss_flow, 'loss_prior': loss_prior}


def time_uniform_sigmas(num_steps, t_max=0.999, dtype=jnp.float32):
    """A sigma grid whose flow times t = linspace(t_max, 0, num_steps + 1) are uniform, ending at sigma = 0."""
    return flow.sigma_of_t(jnp.linspace(t_max, 0.0, num_steps + 1, dtype=dtype))


class FlowMixture:
    """Exact E[z - x0 | x_t] of x0 ~ sum_k w_k N(mu_k, s_k^2 I), z ~ N(0, I), x_t = t z + (1 - t) x0, in t-space:
    x_t | k ~ N((1 - t) mu_k, V_k I), V_k = (1 - t)^2 s_k^2 + t^2; Cov(x0, x_t | k) = (1 - t) s_k^2 I and
    Cov(z, x_t | k) = t I give E[x0 | x_t, k] and E[z | x_t, k] by Gaussian conditioning."""

    def __init__(self, means, stds, weights):
        self.means, self.stds, self.weights = means, stds, weights / jnp.sum(weights)

    def velocity(self, x_t, t):
        t = jnp.broadcast_to(t, x_t.shape[:1])[:, None]                                     # [B, 1]
        flat = x_t.reshape(x_t.shape[0], -1)
        mu = self.means.reshape(self.means.shape[0], -1)                                    # [K, d]
        var = (1 - t) ** 2 * self.stds[None] ** 2 + t ** 2                                  # [B, K]
        residual = flat[:, None] - (1 - t)[:, :, None] * mu[None]                           # [B, K, d]
        logits = (jnp.log(self.weights)[None] - 0.5 * jnp.sum(residual ** 2, -1) / var
                  - 0.5 * flat.shape[1] * jnp.log(var))
        resp = jax.nn.softmax(logits, axis=1)
        x0_k = mu[None] + ((1 - t) * self.stds[None] ** 2 / var)[:, :, None] * residual
        z_k = (t / var)[:, :, None] * residual
        return jnp.sum(resp[:, :, None] * (z_k - x0_k), axis=1).reshape(x_t.shape)


def _mixture(dtype, shape=(2, 2, 3), stds=(0.1, 0.3, 0.2)):
    rng = np.random.default_rng(3)
    means = jnp.asarray(rng.normal(size=(len(stds),) + shape), dtype)
    return means, jnp.asarray(stds, dtype), jnp.asarray([0.2, 0.5, 0.3][:len(stds)], dtype)


def test_denoiser_from_velocity_of_the_exact_flow_velocity_is_the_exact_mixture_denoiser():
    with jax.enable_x64(True):
        means, stds, weights = _mixture(jnp.float64)
        D = flow.denoiser_from_velocity(FlowMixture(means, stds, weights).velocity)
        gmm = analytic.GaussianMixture(means, stds, weights)
        for sigma in (0.02, 0.5, 3.0, 80.0):
            x = jax.random.normal(jax.random.key(0), (6, 2, 2, 3), jnp.float64) * (1 + sigma)
            want = gmm.denoiser(x, sigma)
            for s in (sigma, jnp.full((6,), sigma)):                          # scalar or [B]
                np.testing.assert_allclose(D(x, s), want, rtol=1e-10, atol=1e-10 * sigma)


def test_precond_and_weight_express_the_same_flow():
    with jax.enable_x64(True):
        key = jax.random.key(1)
        A = jax.random.normal(key, (3, 3), jnp.float64)
        velocity = lambda x_t, t: jnp.tanh(x_t @ A) * (1 + t[:, None])           # any velocity network
        x0 = jax.random.normal(jax.random.fold_in(key, 1), (5, 3), jnp.float64)
        z = jax.random.normal(jax.random.fold_in(key, 2), (5, 3), jnp.float64)
        sigma = jnp.array([0.01, 0.3, 1.0, 7.0, 200.0])
        x = x0 + sigma[:, None] * z
        D = flow.denoiser_from_velocity(velocity)(x, sigma)
        np.testing.assert_allclose(precond.apply(velocity, x, flow.precond(sigma)), D, rtol=1e-12)
        t = flow.t_of_sigma(sigma)
        x_t = flow.interpolate(x0, z, t)
        np.testing.assert_allclose(x_t, x / (1 + sigma[:, None]), rtol=1e-12)
        flow_error = (velocity(x_t, t) - flow.velocity_target(x0, z)) ** 2
        np.testing.assert_allclose(flow.weight(sigma)[:, None] * (D - x0) ** 2, flow_error, rtol=1e-9)
        np.testing.assert_allclose(flow.sigma_of_t(t), sigma, rtol=1e-12)


def test_with_aux_is_passed_through():
    velocity = lambda x_t, t: -x_t
    velocity_with_aux = lambda x_t, t: (velocity(x_t, t), {'bottleneck': x_t * 2})

    class Net:
        def __call__(self, x_t, t):
            return velocity(x_t, t)
        with_aux = staticmethod(velocity_with_aux)

    D = flow.denoiser_from_velocity(Net())
    x = jnp.ones((2, 3))
    x0_hat, aux = D.with_aux(x, 1.0)
    np.testing.assert_allclose(x0_hat, D(x, 1.0))
    np.testing.assert_allclose(aux['bottleneck'], x)                           # x_t = x / (1 + sigma) = x / 2
    assert not hasattr(flow.denoiser_from_velocity(velocity), 'with_aux')


def test_euler_in_sigma_is_the_authors_euler_in_t():
    # On a grid uniform in t, sigma-space Euler on denoiser_from_velocity(v) is x_t' = x_t + (t' - t) v(x_t, t).
    with jax.enable_x64(True):
        v = FlowMixture(*_mixture(jnp.float64)).velocity
        num_steps, t_max = 6, 0.999
        sigmas = time_uniform_sigmas(num_steps, t_max, jnp.float64)
        z = jax.random.normal(jax.random.key(2), (5, 2, 2, 3), jnp.float64)
        _, info = samplers.get('euler')(flow.denoiser_from_velocity(v), sigmas[0] * z, sigmas, return_trajectory=True)
        trajectory, times = flow.trajectory_in_time(info['trajectory'], sigmas)
        np.testing.assert_allclose(times, np.linspace(t_max, 0, num_steps + 1), rtol=1e-12, atol=1e-15)
        x_t = t_max * z
        want = [x_t]
        for t, t_next in zip(times[:-1], times[1:]):
            x_t = x_t + (t_next - t) * v(x_t, jnp.full((5,), t))
            want.append(x_t)
        np.testing.assert_allclose(trajectory, jnp.stack(want), rtol=1e-9, atol=1e-10)


def test_euler_trajectory_of_a_one_point_data_set_is_a_straight_line():
    with jax.enable_x64(True):
        mu = jnp.asarray(np.random.default_rng(4).normal(size=(1, 4)))
        point = FlowMixture(mu, jnp.zeros((1,)), jnp.ones((1,)))
        sigmas = time_uniform_sigmas(5, 0.999, jnp.float64)
        z = jax.random.normal(jax.random.key(3), (8, 4), jnp.float64)
        x0, info = samplers.get('euler')(flow.denoiser_from_velocity(point.velocity), sigmas[0] * z, sigmas,
                                         return_trajectory=True)
        trajectory, t = flow.trajectory_in_time(info['trajectory'], sigmas)
        # the line through x_{t0} = t0 z: x_t = (1 - t) mu + t z', z' = z - (1 - t0) / t0 mu
        z_line = z - (1 - t[0]) / t[0] * mu
        line = (1 - t)[:, None, None] * mu[None] + t[:, None, None] * z_line[None]
        np.testing.assert_allclose(trajectory, line, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(x0, jnp.broadcast_to(mu, x0.shape), atol=1e-10)
        assert float(metrics.straightness(trajectory)) < 1e-16
        assert float(metrics.curvature(info['trajectory'], sigmas)) < 1e-14
        # two points: the flow bends, and both measures see it
        two = FlowMixture(jnp.concatenate([mu, -mu]), jnp.zeros((2,)), jnp.ones((2,)))
        _, info = samplers.get('euler')(flow.denoiser_from_velocity(two.velocity), sigmas[0] * z, sigmas,
                                        return_trajectory=True)
        assert float(metrics.straightness(flow.trajectory_in_time(info['trajectory'], sigmas)[0])) > 1e-2
        assert float(metrics.curvature(info['trajectory'], sigmas)) > 1e-2


def test_sample_t_range():
    t = flow.sample_t(jax.random.key(0), (100_000,))
    assert float(t.min()) >= 1e-5 and float(t.max()) <= 1.0
    assert abs(float(t.mean()) - 0.5) < 5e-3


@pytest.mark.parametrize('prior_var', [1.0, jnp.array([36.0, 1.0])])
def test_gaussian_kl_matches_monte_carlo(prior_var):
    key = jax.random.key(5)
    mu = jax.random.normal(key, (3, 2))
    logvar = jax.random.normal(jax.random.fold_in(key, 1), (3, 2))
    n = 400_000
    eps = jax.random.normal(jax.random.fold_in(key, 2), (n, 3, 2))
    z = flow.reparameterize(mu, logvar, eps)
    log_normal = lambda z, m, var: -0.5 * ((z - m) ** 2 / var + jnp.log(2 * jnp.pi * var))
    log_ratio = jnp.sum(log_normal(z, mu, jnp.exp(logvar)) - log_normal(z, 0.0, jnp.asarray(prior_var)), axis=-1)
    estimate, stderr = log_ratio.mean(0), log_ratio.std(0) / np.sqrt(n)
    kl = flow.gaussian_kl(mu, logvar, prior_var)
    assert kl.shape == (3,)
    np.testing.assert_array_less(jnp.abs(kl - estimate), 5 * stderr + 1e-4)
    assert float(flow.prior_loss(mu, logvar, prior_var)) == pytest.approx(float(kl.mean()) / 2, rel=1e-6)
    assert float(jnp.max(jnp.abs(flow.gaussian_kl(jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 4, 4, 3)))))) == 0.0


def test_fastode_loss_conventions():
    # the exact velocity of a one-point data set x0 = mu is (x_t - mu) / t = z - mu: zero flow loss exactly when the
    # interpolation, target and t convention agree (the independent baseline, encoder_fn=None)
    mu = jnp.array([[0.5, -1.0, 2.0]])
    x = jnp.broadcast_to(mu, (64, 3))
    velocity = lambda x_t, t: (x_t - mu) / t[:, None]
    loss, m = fastode_loss(velocity, None, x, jax.random.key(0), beta=20.0)
    assert float(m['loss_flow']) < 1e-9 and float(m['loss_prior']) == 0.0 and float(loss) == float(m['loss_flow'])
    # the velocity of the swapped convention (data at t = 1) is visibly wrong
    swapped = lambda x_t, t: (mu - x_t) / (1 - t[:, None])
    assert float(fastode_loss(swapped, None, x, jax.random.key(0))[1]['loss_flow']) > 1.0
    with pytest.raises(ValueError, match='encoder_fn'):
        fastode_loss(velocity, lambda x: (x[:, :2], x[:, :2]), x, jax.random.key(0))


def _toy_data(key, n):
    side_key, noise_key = jax.random.split(key)
    side = jnp.where(jax.random.bernoulli(side_key, 0.5, (n, 1)), 1.0, -1.0)
    return jnp.concatenate([2 * side, jnp.ones((n, 1))], axis=1) + 0.1 * jax.random.normal(noise_key, (n, 2))


def _toy_nets(hidden=32, dtype=jnp.float32):
    encoder, velocity = MLPEncoder(hidden_dim=hidden, dtype=dtype), TanhMLP(hidden_dim=hidden, dtype=dtype)
    x = _toy_data(jax.random.key(0), 8).astype(dtype)
    params = {'encoder': encoder.init(jax.random.key(1), x)['params'],
              'velocity': velocity.init(jax.random.key(2), x, jnp.ones(8))['params']}

    def loss(params, x, key, beta):
        return fastode_loss(lambda x_t, t: velocity.apply({'params': params['velocity']}, x_t, t),
                                 lambda x: encoder.apply({'params': params['encoder']}, x), x, key, beta=beta)
    return encoder, params, loss


def test_a_very_large_beta_drives_q_to_the_prior():
    encoder, init, loss = _toy_nets()
    optimizer = optax.adam(1e-2)

    @jax.jit
    def step(params, state, i, beta):
        key = jax.random.fold_in(jax.random.key(3), i)
        grads, _ = jax.grad(loss, has_aux=True)(params, _toy_data(jax.random.fold_in(key, 1), 256), key, beta)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    held_out = _toy_data(jax.random.key(9), 2048)

    def trained_kl(beta, steps=300):
        params, state = init, optimizer.init(init)
        for i in range(steps):
            params, state = step(params, state, i, beta)
        return float(flow.prior_loss(*encoder.apply({'params': params['encoder']}, held_out)))

    initial = float(flow.prior_loss(*encoder.apply({'params': init['encoder']}, held_out)))
    assert initial > 0.05
    assert trained_kl(1e3) < 1e-3                  # q(z | x) ~ N(0, I) for every x: the independent coupling
    assert trained_kl(0.1) > 0.3                   # a small beta lets the encoder carry x into z


def test_the_encoder_gets_gradients_from_both_terms():
    with jax.enable_x64(True):
        encoder, params, loss = _toy_nets(hidden=8, dtype=jnp.float64)
        params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), params)
        x = _toy_data(jax.random.key(4), 16).astype(jnp.float64)
        key = jax.random.key(5)
        rng = np.random.default_rng(0)
        direction = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params['encoder'])
        leaves = lambda tree: jnp.concatenate([l.ravel() for l in jax.tree_util.tree_leaves(tree)])

        @jax.jit
        def check(params):
            # per term: its gradient, and the term at encoder parameters shifted by +-h along `direction`
            def term(params, name):
                return loss(params, x, key, 1.0)[1][name]

            def shifted(h, name):
                moved = jax.tree_util.tree_map(lambda p, d: p + h * d, params['encoder'], direction)
                return term({**params, 'encoder': moved}, name)
            return {name: (jax.grad(term)(params, name), shifted(1e-5, name), shifted(-1e-5, name))
                    for name in ('loss_flow', 'loss_prior')}

        for name, (grads, plus, minus) in check(params).items():
            assert float(jnp.linalg.norm(leaves(grads['encoder']))) > 1e-3, name
            # jax.grad against central differences along a random direction of the encoder parameters: a
            # stop_gradient anywhere on the path x -> (mu, logvar) -> z -> (x_t, target) would break the agreement
            directional = float(jnp.dot(leaves(grads['encoder']), leaves(direction)))
            assert directional == pytest.approx(float((plus - minus) / 2e-5), rel=1e-6), name
            if name == 'loss_prior':
                assert float(jnp.abs(leaves(grads['velocity'])).max()) == 0.0


def test_unet_encoder_parameter_count_and_start_at_the_prior():
    mnist = UNetEncoder(img_resolution=28, in_channels=1)
    mnist.validate()
    shapes = jax.eval_shape(lambda x: mnist.init(jax.random.key(0), x), jax.ShapeDtypeStruct((1, 28, 28, 1),
                                                                                                  jnp.float32))
    # the authors' mnist json gives 2.155201M for this UNet with one output channel; the encoder's second output
    # channel adds one 3x3 filter from 64 channels and a bias: 64 * 9 + 1
    assert count_params(shapes['params']) == 2_155_201 + 64 * 9 + 1
    small = UNetEncoder(img_resolution=8, in_channels=3, model_channels=8, channel_mult=(1, 2), num_blocks=1,
                        attn_resolutions=())
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    variables = fast_jit(small.init)(jax.random.key(1, impl='rbg'), x)      # rbg keys: a fast CPU compile

    @fast_jit
    def both(variables, key):
        return small.apply(variables, x), small.apply(variables, x, train=True, rngs={'dropout': key})

    (mu, logvar), (mu_train, _) = both(variables, jax.random.key(2, impl='rbg'))
    assert mu.shape == logvar.shape == mu_train.shape == x.shape
    assert float(flow.prior_loss(mu, logvar)) < 1e-6                           # near-zero output conv: q = N(0, I)
    with pytest.raises(ValueError, match='encoder_type'):
        UNetEncoder(encoder_type='bogus').validate()


def test_tanh_mlp_shapes():
    net = TanhMLP()
    x = jnp.ones((3, 2))
    variables = net.init(jax.random.key(0), x, jnp.ones(3))
    assert count_params(variables['params']) == (3 * 100 + 100) + (100 * 100 + 100) + (100 * 2 + 2)   # theirs
    out, state = net.apply(variables, x, jnp.full((3,), 0.5), mutable=['intermediates'])
    assert out.shape == (3, 2) and not state              # no bottleneck sown: AMED reads zeros (a 2-D MLP)
    mu, logvar = MLPEncoder().apply(MLPEncoder().init(jax.random.key(0), x), x)
    assert mu.shape == logvar.shape == (3, 2)
