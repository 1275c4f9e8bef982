"""Discriminator networks (jaxdiff.models.discriminator) at small sizes: shapes, and that the logit depends on the
noise level, the input and the class label; gradients reach x for guidance."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.core import guidance
from jaxdiff.models.discriminator import DiscriminatorHead, MLPDiscriminator, make_logit_fn

# tiny graphs run once: skipping LLVM optimisation roughly halves their CPU compile time (as tests/test_models.py)
fast_jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def _perturbed(params, seed, scale=0.1):
    """Params + noise drawn on the host, as a trained head would be: EDM's near-zero residual branches would
    otherwise hide the noise-level path at initialisation."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda p: p + scale * rng.standard_normal(p.shape, np.float32), params)


def test_head_shapes_and_dependence_on_sigma_features_and_label():
    head = DiscriminatorHead(model_channels=16, num_blocks=1, num_heads=2, label_dim=3, dropout=0.1)
    features = jax.random.normal(jax.random.key(0), (2, 4, 4, 24))
    sigma = jnp.array([0.1, 5.0])
    labels = jax.nn.one_hot(jnp.array([0, 2]), 3)
    params = _perturbed(fast_jit(head.init)(jax.random.key(1, impl='rbg'), features, sigma, labels)['params'], 0)

    @fast_jit
    def evaluate(params, key):
        f = lambda features, sigma, labels: head.apply({'params': params}, features, sigma, labels)
        grad = jax.grad(lambda features: jnp.sum(f(features, sigma, labels)))(features)
        trained = head.apply({'params': params}, features, sigma, labels, train=True, rngs={'dropout': key})
        return (f(features, sigma, labels), f(features, sigma * 3, labels), f(features * 0.5, sigma, labels),
                f(features, sigma, labels[::-1]), f(features, 2.0, labels), grad, trained)

    logit, other_sigma, other_features, other_labels, scalar_sigma, grad, trained = evaluate(
        params, jax.random.key(2, impl='rbg'))
    assert logit.shape == other_sigma.shape == scalar_sigma.shape == trained.shape == (2,)
    for changed in (other_sigma, other_features, other_labels):
        assert float(jnp.min(jnp.abs(changed - logit))) > 1e-5         # a cut path gives exactly 0
    assert grad.shape == features.shape and bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).max()) > 0


def test_head_validation():
    with pytest.raises(ValueError, match='num_heads'):
        DiscriminatorHead(model_channels=16, num_heads=3).validate()
    with pytest.raises(ValueError, match='model_channels'):
        DiscriminatorHead(model_channels=10).validate()
    head = DiscriminatorHead(model_channels=8, num_blocks=0, num_heads=1)
    with pytest.raises(ValueError, match='features'):
        head.init(jax.random.key(0), jnp.ones((2, 16)), jnp.ones(2))


def test_mlp_discriminator_depends_on_x_and_sigma_and_guides():
    net = MLPDiscriminator(hidden_dim=32, num_layers=2, embedding_dim=16)
    x = jax.random.normal(jax.random.key(0), (4, 2))
    sigma = jnp.array([0.01, 0.3, 2.0, 40.0])
    params = net.init(jax.random.key(1), x, sigma)['params']
    logit_fn = make_logit_fn(net.apply, params)
    logit = logit_fn(x, sigma)
    assert logit.shape == (4,)
    assert float(jnp.min(jnp.abs(logit_fn(x, sigma * 2) - logit))) > 1e-4
    assert float(jnp.min(jnp.abs(logit_fn(x + 0.5 * sigma[:, None], sigma) - logit))) > 1e-4
    # the guided denoiser of any denoiser moves by weight sigma^2 grad_x logit, nonzero and finite
    denoiser = lambda x, sigma: 0.9 * x
    guided = guidance.discriminator_guided(denoiser, logit_fn, weight=2.0)
    delta = guided(x, sigma) - denoiser(x, sigma)
    grad = jax.grad(lambda x: jnp.sum(logit_fn(x, sigma)))(x)
    np.testing.assert_allclose(delta, 2.0 * sigma[:, None] ** 2 * grad, rtol=1e-5, atol=1e-7)
    assert bool(jnp.all(jnp.isfinite(delta))) and float(jnp.abs(delta).max()) > 0
    with pytest.raises(ValueError, match='sigma_data'):
        MLPDiscriminator(sigma_data=0.0).validate()


def test_head_through_a_feature_network_guides_the_image():
    # a frozen "feature network" (a fixed conv with 2x downsampling) in front of the head: grad_x reaches the image
    head = DiscriminatorHead(model_channels=8, num_blocks=1, num_heads=1)
    kernel = jax.random.normal(jax.random.key(3), (3, 3, 3, 12)) * 0.3

    def features_fn(x, sigma):
        scaled = x / jnp.sqrt(1 + jnp.reshape(sigma, (-1, 1, 1, 1)) ** 2)
        return jax.lax.conv_general_dilated(scaled, kernel, (2, 2), 'SAME',
                                            dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

    x = jax.random.normal(jax.random.key(4), (2, 8, 8, 3))
    params = _perturbed(fast_jit(head.init)(jax.random.key(5, impl='rbg'), features_fn(x, 1.0), jnp.ones(2))['params'],
                        1)
    guided = guidance.discriminator_guided(lambda x, sigma: x * 0, make_logit_fn(head.apply, params, features_fn))
    delta = fast_jit(lambda x: guided.correction(x, jnp.array([0.5, 3.0]))[0])(x)
    assert delta.shape == x.shape and float(jnp.min(jnp.abs(delta).reshape(2, -1).max(1))) > 0
