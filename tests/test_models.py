"""Networks: EDM's exact SongUNet parameter counts (eval_shape only), tiny configs actually run, registry, summary."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdiff import models
from jaxdiff.models import layers
from jaxdiff.modes.summary import run as summary

CIFAR = (32, 32, 3)
# Tiny 32x32 SongUNets (3 levels -> 8x8 bottleneck, attention at 16x16, augment_dim=9) that compile in seconds.
TINY = dict(model_channels=16, channel_mult=(1, 1, 2), num_blocks=1, attn_resolutions=(16,), dropout=0.5)


def _perturbed(params, seed, scale=0.05):
    """Params + small noise (drawn on the host: no compile) so every input path visibly reaches F."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda p: p + scale * rng.standard_normal(p.shape, np.float32), params)


# Tests run tiny graphs once: skipping LLVM optimisation roughly halves their CPU compile time.
fast_jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def _key(seed):
    # 'rbg' keys compile far faster than threefry on CPU; the network code is indifferent to the PRNG impl.
    return jax.random.key(seed, impl='rbg')


@pytest.fixture(scope='module')
def tiny_ncsnpp():
    """A tiny NCSN++ (the variant with the most code paths: Fourier embedding, residual encoder, [1,3,3,1] FIR).

    Two compiled functions serve all tests: `evaluate` (train=False, F and the sown bottleneck; the Fourier
    frequencies an argument, default the model's own) and `train_step` (train=True, loss + grads).
    """
    model = models.build('ncsnpp', **TINY)
    x = jax.random.normal(jax.random.key(1), (2, *CIFAR))
    noise_labels = jnp.array([-1.0, 0.7])
    variables = fast_jit(model.init)(_key(0), x, noise_labels)
    params, buffers = variables['params'], variables['buffers']

    @fast_jit
    def evaluate_with(params, freqs, noise_labels, augment_labels, key):
        F, state = model.apply({'params': params, 'buffers': {'map_noise': {'freqs': freqs}}}, x, noise_labels,
                               augment_labels=augment_labels, train=False, rngs={'dropout': key},
                               mutable=['intermediates'])
        return F, state['intermediates']['bottleneck'][0]

    def evaluate(params, noise_labels, augment_labels, key, freqs=buffers['map_noise']['freqs']):
        return evaluate_with(params, freqs, noise_labels, augment_labels, key)

    @fast_jit
    def train_step(params, key):
        def loss(params):
            F = model.apply({'params': params, 'buffers': buffers}, x, noise_labels, train=True,
                            rngs={'dropout': key})
            return jnp.mean(jnp.square(F - x)), F
        return jax.value_and_grad(loss, has_aux=True)(params)

    return model, params, evaluate, train_step, x, noise_labels


@pytest.mark.parametrize('name,expected', [('ddpmpp', 55_733_891), ('ncsnpp', 56_397_827)])
def test_edm_cifar10_parameter_counts_are_exact(name, expected):
    # EDM's CIFAR-10 networks (Karras et al. 2022, Table 7): trainable counts of the PyTorch reference.
    model = models.build(name)
    assert models.count_params(models.param_shapes(model, CIFAR)) == expected


def test_ncsnpp_and_ddpmpp_differ_in_structure():
    ddpmpp = models.param_shapes(models.build('ddpmpp'), CIFAR)
    ncsnpp = models.param_shapes(models.build('ncsnpp'), CIFAR)
    assert set(ncsnpp) - set(ddpmpp) == {'enc_16x16_aux_residual', 'enc_8x8_aux_residual'}
    # Fourier embedding with channel_mult_noise=2 feeds 256 noise channels to the mapping MLP, positional 128.
    assert ncsnpp['map_layer0']['kernel'].shape == (256, 512)
    assert ddpmpp['map_layer0']['kernel'].shape == (128, 512)
    # Same layer shapes elsewhere: the resample filter changes no parameter.
    assert ddpmpp['enc_16x16_down']['conv0']['kernel'].shape == ncsnpp['enc_16x16_down']['conv0']['kernel'].shape


def test_output_shape_bottleneck_and_near_zero_init(tiny_ncsnpp):
    model, params, evaluate, train_step, x, noise_labels = tiny_ncsnpp
    F, bottleneck = evaluate(params, noise_labels, jnp.zeros((2, 9)), _key(0))
    assert F.shape == x.shape and F.dtype == jnp.float32
    assert bottleneck.shape == (2, 8, 8, 32)
    # EDM initialises the output conv with init_weight=1e-5 (not exactly 0): F is tiny but not identically zero.
    assert 0 < float(jnp.max(jnp.abs(F))) < 1e-3


def test_dropout_only_in_train_mode(tiny_ncsnpp):
    model, params, evaluate, train_step, x, noise_labels = tiny_ncsnpp
    params = _perturbed(params, 2)
    augment_labels = jnp.zeros((2, 9))
    np.testing.assert_array_equal(evaluate(params, noise_labels, augment_labels, _key(0))[0],
                                  evaluate(params, noise_labels, augment_labels, _key(1))[0])
    (_, F0), _ = train_step(params, _key(0))
    (_, F1), _ = train_step(params, _key(1))
    assert float(jnp.max(jnp.abs(F0 - F1))) > 1e-3


def test_noise_and_augment_labels_reach_the_output(tiny_ncsnpp):
    model, params, evaluate, train_step, x, noise_labels = tiny_ncsnpp
    params = _perturbed(params, 3)
    base = evaluate(params, noise_labels, jnp.zeros((2, 9)), _key(0))[0]
    augmented = evaluate(params, noise_labels, jax.random.normal(jax.random.key(4), (2, 9)), _key(0))[0]
    assert float(jnp.max(jnp.abs(augmented - base))) > 1e-3
    shifted = evaluate(params, noise_labels + 0.5, jnp.zeros((2, 9)), _key(0))[0]
    assert float(jnp.max(jnp.abs(shifted - base))) > 1e-3


def test_backward_is_finite_and_reaches_the_output_conv(tiny_ncsnpp):
    model, params, evaluate, train_step, x, noise_labels = tiny_ncsnpp
    (loss, _), grads = train_step(params, _key(5))
    assert np.isfinite(float(loss))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
    # The near-zero-initialised output conv gets a full-size gradient, so training starts.
    assert float(jnp.max(jnp.abs(grads['dec_32x32_aux_conv']['kernel']))) > 1e-3


def test_compute_dtype_flows_to_convolutions_but_params_and_output_stay_float32():
    model = models.build('ddpmpp', **TINY, dtype='bfloat16')
    x = jnp.zeros((1, *CIFAR))
    params = models.param_shapes(model, CIFAR)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
    jaxpr = jax.make_jaxpr(lambda p: model.apply({'params': p}, x, jnp.zeros((1,))))(params)
    convs = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == 'conv_general_dilated']
    assert convs and all(e.outvars[0].aval.dtype == jnp.bfloat16 for e in convs)
    assert jaxpr.out_avals[0].dtype == jnp.float32


@pytest.mark.parametrize('taps', [(1, 1), (1, 3, 3, 1)])
def test_fir_resampling_matches_edm_transposed_and_strided_convolutions(taps):
    # Reference, 1-D and separable: EDM downsamples with conv2d(f f^T/(sum f)^2, stride 2, pad p) and upsamples with
    # conv_transpose2d(4 f f^T/(sum f)^2, stride 2, pad p), p = (len(f)-1)//2.
    f = np.asarray(taps, np.float64) / np.sum(taps)
    k, p = len(f), (len(f) - 1) // 2
    x = np.random.default_rng(0).normal(size=8)

    def down1d(v):
        padded = np.pad(v, p)
        return np.array([np.dot(padded[2 * o:2 * o + k], f) for o in range(len(v) // 2)])

    def up1d(v):
        full = np.zeros(2 * (len(v) - 1) + k)
        for i, value in enumerate(v):
            full[2 * i:2 * i + k] += 2 * f * value
        return full[p:p + 2 * len(v)]

    image = np.outer(x, x[::-1])[None, :, :, None]  # separable test image [1, 8, 8, 1]
    np.testing.assert_allclose(layers.downsample(jnp.asarray(image, jnp.float32), taps)[0, :, :, 0],
                               np.outer(down1d(x), down1d(x[::-1])), atol=1e-5)
    np.testing.assert_allclose(layers.upsample(jnp.asarray(image, jnp.float32), taps)[0, :, :, 0],
                               np.outer(up1d(x), up1d(x[::-1])), atol=1e-5)


def _edm_resampling_reference(x, taps, up, padding=None):
    """EDM's resampling as it defines it: a per-channel (grouped) strided conv with f f^T / (sum f)^2, or the
    transposed conv with 4 f f^T / (sum f)^2 (as a conv of the 2x-dilated input with the flipped kernel)."""
    f = np.asarray(taps, np.float64)
    kernel = np.outer(f, f) / np.square(f.sum()) * (4 if up else 1)
    k, channels = len(f), x.shape[-1]
    p = (k - 1) // 2 if padding is None else padding
    kernel = jnp.asarray(np.tile(kernel[::-1, ::-1][:, :, None, None], (1, 1, 1, channels)), jnp.float32)
    return jax.lax.conv_general_dilated(x, kernel, (1, 1) if up else (2, 2), [(k - 1 - p, k - 1 - p) if up else (p, p)] * 2,
                                        lhs_dilation=(2, 2) if up else (1, 1), feature_group_count=channels,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                        precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize('taps', [(1, 1), (1, 3, 3, 1), (1, 2, 1)])
def test_resampling_by_slices_equals_edm_grouped_convolutions(taps):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 6, 5)), jnp.float32)
    np.testing.assert_allclose(layers.upsample(x, taps), _edm_resampling_reference(x, taps, up=True), atol=2e-6)
    np.testing.assert_allclose(layers.downsample(x, taps), _edm_resampling_reference(x, taps, up=False), atol=2e-6)
    # NCSN++'s fused conv-then-downsample path calls it with padding 0.
    np.testing.assert_allclose(layers.downsample(x, taps, padding=0),
                               _edm_resampling_reference(x, taps, up=False, padding=0), atol=2e-6)


def test_fir_11_is_exactly_a_2x2_mean_and_a_nearest_repeat():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 8, 3)), jnp.float32)
    np.testing.assert_allclose(layers.downsample(x, (1, 1)), x.reshape(2, 4, 2, 4, 2, 3).mean(axis=(2, 4)),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(layers.upsample(x, (1, 1)), jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
    # and no convolution is left in the graph
    jaxpr = jax.make_jaxpr(lambda x: layers.upsample(layers.downsample(x, (1, 1)), (1, 1)))(x)
    assert 'conv_general_dilated' not in {e.primitive.name for e in jaxpr.jaxpr.eqns}


def test_group_norm_and_its_hand_written_backward_match_the_formula():
    def reference(x, scale, bias, groups, eps=1e-6):   # GroupNorm straight from its definition, autodiffed
        grouped = x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
        mean = grouped.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(grouped - mean).mean(axis=(1, 2, 4), keepdims=True)
        return ((grouped - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape) * scale + bias

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(loc=0.7, scale=2.0, size=(3, 6, 5, 32)), jnp.float32)   # non-zero mean
    scale, bias = (jnp.asarray(rng.normal(size=32), jnp.float32) for _ in range(2))
    dy = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    y, vjp = jax.vjp(lambda *a: layers.group_norm(*a, groups=8), x, scale, bias)
    y_ref, vjp_ref = jax.vjp(lambda *a: reference(*a, groups=8), x, scale, bias)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(vjp(dy), vjp_ref(dy)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want))))


def test_ncsnpp_fourier_frequencies_are_a_stored_untrained_buffer(tiny_ncsnpp):
    model, params, evaluate, train_step, x, noise_labels = tiny_ncsnpp
    # Full-size NCSN++: 256 noise channels -> 128 frequencies, in 'buffers', outside the trainable count.
    shapes = jax.eval_shape(lambda: models.init(models.build('ncsnpp'), CIFAR, jax.random.key(0)))
    assert set(shapes) == {'params', 'buffers'}
    assert jax.tree.map(lambda s: s.shape, shapes['buffers']) == {'map_noise': {'freqs': (128,)}}
    assert 'map_noise' not in shapes['params']
    # Drawn at init from the init key (EDM: randn * 16 when the network is built), so two inits differ.
    draw = fast_jit(lambda key: models.init(model, CIFAR, key)['buffers']['map_noise']['freqs'])  # the rest is DCE'd
    freqs = [draw(_key(seed)) for seed in (0, 1)]
    assert freqs[0].shape == (16,) and float(jnp.max(jnp.abs(freqs[0] - freqs[1]))) > 1.0
    # The stored draw is what the network uses: other frequencies, other outputs (also of the bottleneck).
    params = _perturbed(params, 6)
    augment_labels = jnp.zeros((2, 9))
    F0, b0 = evaluate(params, noise_labels, augment_labels, _key(0), freqs=freqs[0])
    F1, b1 = evaluate(params, noise_labels, augment_labels, _key(0), freqs=freqs[1])
    assert float(jnp.max(jnp.abs(F0 - F1))) > 1e-3 and float(jnp.max(jnp.abs(b0 - b1))) > 1e-3
    # Applying without the collection is an error naming it, not a silent default draw.
    with pytest.raises(Exception, match='buffers'):
        model.apply({'params': params}, x, noise_labels)


def test_positional_embedding_is_sin_cos_of_geometric_frequencies():
    emb = layers.positional_embedding(jnp.array([0.0, 3.0]), 8)
    freqs = (1 / 10000) ** (np.arange(4) / 3)  # endpoint=True: last frequency is exactly 1/max_positions
    np.testing.assert_allclose(emb[1], np.concatenate([np.sin(3 * freqs), np.cos(3 * freqs)]), rtol=1e-5)
    np.testing.assert_array_equal(emb[0], np.concatenate([np.zeros(4), np.ones(4)]))


@pytest.mark.parametrize('shape', [(2,), (4, 4, 1)])
def test_mlp_shapes_and_bottleneck(shape):
    model = models.build('mlp', hidden_dim=32, num_layers=2, embedding_dim=16)
    x = jax.random.normal(jax.random.key(0), (3, *shape))
    noise_labels = jnp.array([0.0, 1.0, -2.0])

    @fast_jit  # one compile: init, outputs at init, and the noise-level response of perturbed params
    def run():
        params = model.init(_key(1), x, noise_labels)['params']
        F, state = model.apply({'params': params}, x, noise_labels, augment_labels=jnp.ones((3, 9)),
                               mutable=['intermediates'])
        hidden = state['intermediates']['bottleneck'][0]
        variables = {'params': _perturbed(params, 2)}
        response = model.apply(variables, x, noise_labels) - model.apply(variables, x, noise_labels + 1.0)
        return F, hidden, response

    F, hidden, response = run()
    assert F.shape == x.shape and hidden.shape == (3, 32)
    assert 0 < float(jnp.max(jnp.abs(F))) < 1e-3  # near-zero output init, as the UNet
    assert float(jnp.max(jnp.abs(response))) > 1e-3


def test_build_errors_name_the_problem():
    assert {'ddpmpp', 'mlp', 'ncsnpp'} <= set(models.names()) and models.names() == sorted(models.names())
    with pytest.raises(ValueError, match=f"unknown model 'foo'; valid models: {', '.join(models.names())}$"):
        models.build('foo')
    with pytest.raises(ValueError,
                       match=r"model 'ddpmpp' has no field\(s\) hidden_dim; valid fields: .*model_channels"):
        models.build('ddpmpp', hidden_dim=3)
    with pytest.raises(ValueError, match='embedding_type'):
        models.build('ncsnpp', embedding_type='sinusoidal')
    with pytest.raises(ValueError, match='img_resolution'):
        models.build('ddpmpp', img_resolution=30)
    config = ml_collections.ConfigDict(dict(model=dict(name='ddpmpp', in_channels=3), data=dict(shape=(16, 16, 1))))
    with pytest.raises(ValueError, match=r'model.in_channels=3 disagrees with data.shape=\(16, 16, 1\)'):
        models.from_config(config)
    with pytest.raises(ValueError, match='expects x of shape'):
        jax.eval_shape(models.build('ddpmpp', **TINY).init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)),
                       jnp.zeros((1,)))


def test_from_config_takes_shape_fields_from_data():
    config = ml_collections.ConfigDict(dict(model=dict(name='ddpmpp', model_channels=32, channel_mult=[1, 2],
                                                       num_blocks=1, attn_resolutions=[], augment_dim=0),
                                            data=dict(name='digits', shape=(16, 16, 1))))
    model = models.from_config(config)
    assert (model.img_resolution, model.in_channels, model.out_channels) == (16, 1, 1)
    assert model.channel_mult == (1, 2)
    # The small digits config documented in jaxdiff.models.
    assert models.count_params(models.param_shapes(model, (16, 16, 1))) == 715_201


def test_summary_ends_with_trainable_parameter_count(capsys):
    config = ml_collections.ConfigDict(dict(model=dict(name='ddpmpp', dropout=0.13, augment_dim=9),
                                            data=dict(name='cifar10', shape=(32, 32, 3))))
    assert summary(config, '/nonexistent/workdir') == 55_733_891
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == 'parameters: 55733891'
    assert any(line.startswith('enc_16x16_block0/qkv') for line in lines)


def test_ncsnpp_frequencies_survive_a_checkpoint_round_trip(tmp_path):
    """The 'buffers' collection is saved with the model (the EMA item's model_state) and restored as it was drawn."""
    from jaxdiff.drivers import checkpoint, mesh as mesh_lib
    model = models.build('ncsnpp', **TINY)
    variables = fast_jit(lambda key: models.init(model, CIFAR, key))(_key(3))
    item = {'params': variables['params'], 'model_state': {'buffers': variables['buffers']}}
    checkpoints = checkpoint.Checkpoints(tmp_path)
    checkpoints.save(0, None, ema=item)
    checkpoints.wait_until_finished()
    abstract = checkpoint.abstract_like(item, mesh_lib.replicated(mesh_lib.make_mesh()))
    restored = checkpoints.restore(abstract, 0, item='ema')
    checkpoints.close()
    freqs = variables['buffers']['map_noise']['freqs']
    np.testing.assert_array_equal(restored['model_state']['buffers']['map_noise']['freqs'], freqs)
    assert float(jnp.std(freqs)) > 1.0          # EDM's draw: randn * 16, not a placeholder
