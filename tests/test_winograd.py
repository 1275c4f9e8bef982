"""Winograd F(2x2, 3x3) (models/winograd.py) against lax.conv_general_dilated: the 1-D identity the matrices encode,
the 2-D convolution and both of its gradients for every padding the network uses, and a whole SongUNet."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import models
from jaxdiff.models import layers, winograd

fast_jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def reference_conv(x, w, padding):
    return jax.lax.conv_general_dilated(x, w, (1, 1), [(padding, padding)] * 2,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                        precision=jax.lax.Precision.HIGHEST)


def relative_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_f23_matrices_compute_the_1d_correlation_exactly():
    # Lavin & Gray 2016, eq. 6: y = A^T [(G g) * (B^T d)] is the correlation y_o = sum_k g_k d_{o+k}, o = 0, 1.
    rng = np.random.default_rng(0)
    B_T, G, A_T = (np.asarray(m, np.float64) for m in (winograd.B_T, winograd.G, winograd.A_T))
    for _ in range(5):
        d, g = rng.standard_normal(4), rng.standard_normal(3)
        np.testing.assert_allclose(A_T @ ((G @ g) * (B_T @ d)), [g @ d[0:3], g @ d[1:4]], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize('height,width,padding', [(8, 8, 1), (7, 5, 1), (8, 6, 2), (9, 8, 0)])
def test_conv3x3_and_its_gradients_match_xla_convolution(height, width, padding):
    # Even and odd sizes (partial tiles), 'same' (1), NCSN++'s fused-downsampling pad (2) and 'valid' (0).
    rng = np.random.default_rng(height * 100 + width * 10 + padding)
    x = jnp.asarray(rng.standard_normal((2, height, width, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 16, 24)) / 12, jnp.float32)
    out_shape = (2, height + 2 * padding - 2, width + 2 * padding - 2, 24)
    dy = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)

    @fast_jit
    def both(x, w, dy):
        results = []
        for conv in (lambda x, w: winograd.conv3x3(x, w, padding), lambda x, w: reference_conv(x, w, padding)):
            y, vjp = jax.vjp(conv, x, w)
            results.append((y, *vjp(dy)))
        return results

    (y, dx, dw), (y_ref, dx_ref, dw_ref) = both(x, w, dy)
    assert y.shape == out_shape and dx.shape == x.shape and dw.shape == w.shape
    # float32 round-off: the transforms only add, negate and halve (the direct conv's own error is ~1e-7 here).
    assert relative_error(y, y_ref) < 2e-6
    assert relative_error(dx, dx_ref) < 2e-6
    assert relative_error(dw, dw_ref) < 2e-6


def test_conv2d_dispatch_by_algorithm_and_channels():
    x = jnp.ones((1, 8, 8, 16), jnp.float32)
    primitives = lambda fn, *args: {e.primitive.name for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns}
    w3 = jnp.ones((3, 3, 16, 16), jnp.float32)
    assert 'conv_general_dilated' in primitives(lambda x, w: layers.conv2d(x, w, 1, 'xla'), x, w3)
    assert 'conv_general_dilated' not in primitives(lambda x, w: layers.conv2d(x, w, 1, 'winograd'), x, w3)
    # Few output channels (the network's output conv): the transforms would cost more than they save.
    w_out = jnp.ones((3, 3, 16, 3), jnp.float32)
    assert 'conv_general_dilated' in primitives(lambda x, w: layers.conv2d(x, w, 1, 'winograd'), x, w_out)
    # 1x1: a matmul, whatever the algorithm.
    assert 'conv_general_dilated' not in primitives(lambda x, w: layers.conv2d(x, w, 0, 'xla'), x, w3[:1, :1])
    assert layers.resolve_conv_algorithm('auto') in ('xla', 'winograd')
    with pytest.raises(ValueError, match="model.conv_algorithm='fft'; valid: auto, xla, winograd"):
        layers.resolve_conv_algorithm('fft')
    with pytest.raises(ValueError, match='conv_algorithm'):
        models.build('ddpmpp', conv_algorithm='fft')


def test_songunet_output_does_not_depend_on_the_algorithm():
    # A tiny DDPM++ whose 3x3 layers have >= 16 channels: all but the first and last run by Winograd. (Gradients
    # are checked layer by layer above; a whole network's backward would only cost compile time.)
    model = models.build('ddpmpp', model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(),
                         dropout=0.0, augment_dim=0, img_resolution=8)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.float32)
    noise_labels = jnp.asarray([-0.5, 1.0], jnp.float32)
    params = jax.eval_shape(lambda: models.init(model, (8, 8, 3), jax.random.key(0)))['params']
    params = jax.tree.map(lambda p: jnp.asarray(0.2 * rng.standard_normal(p.shape), jnp.float32), params)
    outputs = fast_jit(lambda p: [model.clone(conv_algorithm=a).apply({'params': p}, x, noise_labels)
                                  for a in ('xla', 'winograd')])(params)
    assert float(jnp.max(jnp.abs(outputs[0]))) > 0.1
    assert relative_error(outputs[1], outputs[0]) < 1e-5
