"""ADM networks (models/adm.py), their torch-free import (convert/adm.py) and iDDPM preconditioning (core/iddpm.py).

NumPy references are written here from the formulas of guided-diffusion (Dhariwal & Nichol 2021) and EDM (Karras et
al. 2022, App. C.3.4), in float64. torch is optional: the tests that write .pt files skip without it; the comparison
with the authors' own PyTorch modules runs only where guided-diffusion is importable (e.g. PYTHONPATH=<its checkout>).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxdiff.convert import adm as convert
from jaxdiff.core import iddpm
from jaxdiff.core.errors import UserError
from jaxdiff.models import adm
from jaxdiff.models.denoiser import Denoiser

# ---------------------------------------------------------------------------------------------- small networks

# (kind, fields): a 32x32 UNet (attention at 16 and 8, scale-shift norm, resblock up/down, class-conditional,
# learn_sigma, 2 legacy heads); the 64x64 ADM's flags at 16x16 with small widths (64 channels per head, new attention
# order); the classifier with attention pooling (DG's 32x32 layout at width 32, 32 channels per head).
UNET32 = ('unet', convert.unet_fields(image_size=32, num_channels=32, num_res_blocks=1, channel_mult='1,1,2',
                                      learn_sigma=True, class_cond=True, num_classes=10, attention_resolutions='16,8',
                                      num_heads=2, use_scale_shift_norm=True, resblock_updown=True))
UNET64_STYLE = ('unet', convert.unet_fields(image_size=16, num_channels=64, num_res_blocks=1, channel_mult='1,2',
                                            learn_sigma=True, class_cond=True, num_classes=10,
                                            attention_resolutions='16,8', num_head_channels=64,
                                            use_new_attention_order=True, use_scale_shift_norm=True,
                                            resblock_updown=True, dropout=0.1))
CLASSIFIER = ('classifier', {**convert.classifier_fields(image_size=32, classifier_width=32, classifier_depth=1,
                                                         classifier_attention_resolutions='16,8', out_channels=10),
                             'num_head_channels': 32})
NETWORKS = {'unet32': UNET32, 'unet64_style': UNET64_STYLE, 'classifier': CLASSIFIER}


def randomize(tree, seed, scale=1.0):
    """A tree like `tree` (arrays or ShapeDtypeStructs) with every leaf ~ N(0, scale^2 / fan_in) (fan_in: the
    product of all but the last axis; 1-D leaves N(0, 0.3^2)), so that the zero-initialised layers are not zero.
    NumPy's generator: no compilation per shape."""
    rng = np.random.default_rng(seed)

    def draw(leaf):
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
        std = scale / np.sqrt(fan_in) if len(leaf.shape) > 1 else 0.3
        return jnp.asarray(rng.standard_normal(leaf.shape).astype(np.float32) * np.float32(std))
    return jax.tree_util.tree_map(draw, tree)


def random_variables(model, seed=0):
    return randomize(convert.variable_shapes(model), seed)


def random_params(module, *args, seed=0):
    """Random 'params' of a layer for inputs `args` (shapes from jax.eval_shape: nothing is compiled)."""
    return randomize(jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a), *args)['params'], seed)


def one_hot(labels, n):
    return jax.nn.one_hot(jnp.asarray(labels), n)


# ---------------------------------------------------------------------------------------------- NumPy references

def np_group_norm(x, scale, bias, groups=32, eps=1e-5):
    x = np.asarray(x, np.float64)
    batch, channels = x.shape[0], x.shape[-1]
    g = x.reshape(batch, -1, groups, channels // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = g.var(axis=(1, 3), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def np_silu(x):
    return x / (1 + np.exp(-x))


def np_conv(x, w, b, stride=1):
    """Zero-padded (k // 2) convolution of NHWC x with an HWIO kernel."""
    k = w.shape[0]
    p = k // 2
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (p, p), (p, p), (0, 0)))
    height = (x.shape[1] + 2 * p - k) // stride + 1
    width = (x.shape[2] + 2 * p - k) // stride + 1
    out = np.zeros((x.shape[0], height, width, w.shape[3]))
    for i in range(k):
        for j in range(k):
            out += xp[:, i:i + stride * (height - 1) + 1:stride, j:j + stride * (width - 1) + 1:stride] @ w[i, j]
    return out + b


def np_attention(qkv, heads, new_order):
    """softmax(q k^T / sqrt(ch)) v per head; legacy channels [head, (q, k, v), ch], new [(q, k, v), head, ch]."""
    qkv = np.asarray(qkv, np.float64)
    batch, length, width = qkv.shape
    ch = width // (3 * heads)
    out = np.zeros((batch, length, heads * ch))
    for h in range(heads):
        if new_order:
            q, k, v = (qkv[..., (part * heads + h) * ch:(part * heads + h + 1) * ch] for part in range(3))
        else:
            q, k, v = (qkv[..., (3 * h + part) * ch:(3 * h + part + 1) * ch] for part in range(3))
        logits = q @ k.transpose(0, 2, 1) / np.sqrt(ch)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out[..., h * ch:(h + 1) * ch] = weights @ v
    return out


def np_timestep_embedding(t, dim, max_period=10000, dtype=np.float64):
    """[cos(t f_i), sin(t f_i)], f_i = exp(-ln(max_period) i / half). dtype=float32: the exponent and the arguments
    t f_i rounded to float32 as the authors' code forms them (f_i itself correctly rounded); cos and sin in
    float64."""
    half = dim // 2
    exponent = (dtype(-np.log(max_period)) * np.arange(half, dtype=dtype) / dtype(half)).astype(np.float64)
    freqs = np.exp(exponent).astype(dtype)
    args = (np.asarray(t, dtype)[:, None] * freqs[None]).astype(np.float64)
    emb = np.concatenate([np.cos(args), np.sin(args)], axis=-1)
    return np.concatenate([emb, np.zeros_like(emb[:, :1])], axis=-1) if dim % 2 else emb


def np_resblock(p, x, emb, scale_shift, up=False, down=False):
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
    h = np_silu(np_group_norm(x, p['in_layers_0']['scale'], p['in_layers_0']['bias']))
    if up:
        h, x = (a.repeat(2, axis=1).repeat(2, axis=2) for a in (h, x))
    if down:
        h, x = (a.reshape(a.shape[0], a.shape[1] // 2, 2, a.shape[2] // 2, 2, a.shape[3]).mean(axis=(2, 4))
                for a in (h, x))
    h = np_conv(h, p['in_layers_2']['kernel'], p['in_layers_2']['bias'])
    e = np_silu(np.asarray(emb, np.float64)) @ p['emb_layers_1']['kernel'] + p['emb_layers_1']['bias']
    norm = p['out_layers_0']
    if scale_shift:
        scale, shift = np.split(e, 2, axis=-1)
        h = np_group_norm(h, norm['scale'], norm['bias']) * (1 + scale[:, None, None]) + shift[:, None, None]
    else:
        h = np_group_norm(h + e[:, None, None], norm['scale'], norm['bias'])
    h = np_conv(np_silu(h), p['out_layers_3']['kernel'], p['out_layers_3']['bias'])
    if 'skip_connection' in p:
        x = np_conv(x, p['skip_connection']['kernel'], p['skip_connection']['bias'])
    return x + h


def np_u_grid(M=1000, C_1=0.001, C_2=0.008):
    """EDM's u_j recursion (App. C.3.4; generate.py's 'iddpm' discretisation), float64."""
    alpha_bar = lambda j: np.sin(0.5 * np.pi * j / M / (C_2 + 1)) ** 2
    u = np.zeros(M + 1, np.float64)
    for j in range(M, 0, -1):
        u[j - 1] = np.sqrt((u[j] ** 2 + 1) / np.clip(alpha_bar(j - 1) / alpha_bar(j), C_1, None) - 1)
    return u


def assert_close(actual, expected, rtol=1e-5):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error = np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30)
    assert error <= rtol, f'relative error {error:.3g} > {rtol}'


# ---------------------------------------------------------------------------------------------- (b) numerics

def test_timestep_embedding_matches_formula():
    t = np.array([0.0, 1.0, 17.5, 999.0], np.float32)
    for dim in (32, 33):
        got = adm.timestep_embedding(jnp.asarray(t), dim)
        assert got.shape == (4, dim)
        assert_close(got, np_timestep_embedding(t, dim, dtype=np.float32), rtol=1e-6)
        assert_close(got, np_timestep_embedding(t, dim), rtol=1e-4)      # float32 arguments up to t = 999
    assert np.all(np.asarray(adm.timestep_embedding(jnp.asarray(t), 33))[:, -1] == 0)


def test_qkv_attention_legacy_and_new_order_on_the_same_weights():
    heads, ch, length = 3, 8, 10
    qkv = jax.random.normal(jax.random.key(1), (2, length, 3 * heads * ch))
    legacy = adm.qkv_attention(qkv, heads, new_order=False)
    new = adm.qkv_attention(qkv, heads, new_order=True)
    assert_close(legacy, np_attention(qkv, heads, new_order=False))
    assert_close(new, np_attention(qkv, heads, new_order=True))
    assert not np.allclose(legacy, new, atol=1e-3)           # the split order matters
    # the same attention, with the projection's channels permuted from [head, part, ch] to [part, head, ch]
    permuted = np.asarray(qkv).reshape(2, length, heads, 3, ch).transpose(0, 1, 3, 2, 4).reshape(qkv.shape)
    np.testing.assert_allclose(adm.qkv_attention(jnp.asarray(permuted), heads, new_order=True), legacy,
                               rtol=1e-6, atol=1e-6)


def test_attention_block_matches_formula_in_both_orders():
    x = jax.random.normal(jax.random.key(2), (2, 4, 4, 64))
    for new_order in (False, True):
        block = adm.AttentionBlock(num_heads=1, num_head_channels=16, use_new_attention_order=new_order)
        params = random_params(block, x, seed=3)
        p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
        h = np_group_norm(x, p['norm']['scale'], p['norm']['bias']).reshape(2, 16, 64)
        h = np_attention(h @ p['qkv']['kernel'] + p['qkv']['bias'], 4, new_order)
        expected = np.asarray(x) + (h @ p['proj_out']['kernel'] + p['proj_out']['bias']).reshape(x.shape)
        assert_close(block.apply({'params': params}, x), expected)


def test_attention_pooling_matches_formula():
    x = jax.random.normal(jax.random.key(4), (3, 4, 4, 64))
    pool = adm.AttentionPool2d(spacial_dim=4, num_head_channels=16, output_dim=7)
    params = random_params(pool, x, seed=5)
    assert params['positional_embedding'].shape == (17, 64)
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    tokens = np.asarray(x, np.float64).reshape(3, 16, 64)
    tokens = np.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1) + p['positional_embedding']
    attended = np_attention(tokens @ p['qkv_proj']['kernel'] + p['qkv_proj']['bias'], 4, new_order=True)
    expected = attended[:, 0] @ p['c_proj']['kernel'] + p['c_proj']['bias']
    out = pool.apply({'params': params}, x)
    assert out.shape == (3, 7)
    assert_close(out, expected)


def test_group_norm32_uses_eps_1e5():
    # variance 1e-6 per group: eps = 1e-5 dominates, so another eps (EDM's 1e-6) would be far off
    x = 1e-3 * jax.random.normal(jax.random.key(6), (2, 4, 4, 64))
    norm = adm.GroupNorm32()
    params = random_params(norm, x, seed=7)
    p = jax.tree_util.tree_map(np.asarray, params)
    assert_close(norm.apply({'params': params}, x), np_group_norm(x, p['scale'], p['bias']), rtol=1e-5)
    assert not np.allclose(norm.apply({'params': params}, x), np_group_norm(x, p['scale'], p['bias'], eps=1e-6),
                           rtol=1e-2)


@pytest.mark.parametrize('scale_shift,up,down,channels_in,channels_out', [
    (True, False, True, 64, 64),      # scale-shift norm, resblock down (avg pool of h and x)
    (False, True, False, 64, 64),     # plain (emb added before the norm), resblock up (nearest)
    (True, False, False, 32, 64),     # channel change: 1x1 skip conv
])
def test_resblock_matches_formula(scale_shift, up, down, channels_in, channels_out):
    x = jax.random.normal(jax.random.key(8), (2, 8, 8, channels_in))
    emb = jax.random.normal(jax.random.key(9), (2, 48))
    block = adm.ResBlock(channels_out, use_scale_shift_norm=scale_shift, up=up, down=down)
    params = random_params(block, x, emb, seed=10)
    assert ('skip_connection' in params) == (channels_in != channels_out)
    assert params['emb_layers_1']['kernel'].shape == (48, 2 * channels_out if scale_shift else channels_out)
    out = block.apply({'params': params}, x, emb)
    assert_close(out, np_resblock(params, x, emb, scale_shift, up, down))
    # the scale-shift function itself: GroupNorm * (1 + scale) + shift
    normed = jax.random.normal(jax.random.key(11), (2, 3, 3, 4))
    scale, shift = jax.random.normal(jax.random.key(12), (2, 2, 4))
    assert_close(adm.scale_shift(normed, scale, shift),
                 np.asarray(normed) * (1 + np.asarray(scale)[:, None, None]) + np.asarray(shift)[:, None, None])


def test_down_and_up_sampling_layers():
    x = jax.random.normal(jax.random.key(13), (2, 8, 8, 32))
    down = adm.Downsample(32, use_conv=True)
    params = random_params(down, x, seed=14)
    assert_close(down.apply({'params': params}, x),
                 np_conv(x, np.asarray(params['op']['kernel']), np.asarray(params['op']['bias']), stride=2))
    pooled = adm.Downsample(32, use_conv=False).apply({}, x)
    assert_close(pooled, np.asarray(x).reshape(2, 4, 2, 4, 2, 32).mean(axis=(2, 4)))
    up = adm.Upsample(32, use_conv=True)
    params = random_params(up, x, seed=15)
    nearest = np.asarray(x).repeat(2, axis=1).repeat(2, axis=2)
    assert_close(up.apply({'params': params}, x),
                 np_conv(nearest, np.asarray(params['conv']['kernel']), np.asarray(params['conv']['bias'])))


def test_zero_initialised_output_convs():
    # a one-level UNet with attention: input conv, ResBlock + attention, middle block, output blocks, output head
    model = convert.build_model('unet', convert.unet_fields(image_size=8, num_channels=32, num_res_blocks=1,
                                                            channel_mult='1', attention_resolutions='8',
                                                            learn_sigma=True))
    x = jax.random.normal(jax.random.key(1), (1, 8, 8, 3))
    params = jax.jit(model.init)(jax.random.key(0), x, jnp.ones((1,)))['params']
    flat = {convert.torch_name(path): v for path, v in traverse_util.flatten_dict(params).items()}
    zero = [name for name in flat if name.startswith('out.2.') or '.out_layers.3.' in name or '.proj_out.' in name]
    assert len(zero) == 2 * (1 + 5 + 4)   # out.2, the out_layers.3 of 5 ResBlocks, the proj_out of 4 attention blocks
    for name, value in flat.items():
        if name in zero or name.endswith('.bias') or name.startswith('out.0') or '_layers.0.' in name \
                or '.norm.' in name:
            continue
        assert np.any(np.asarray(value)), name
    for name in zero:
        assert not np.any(np.asarray(flat[name])), name


# ---------------------------------------------------------------------------------------------- iDDPM

def test_iddpm_u_grid_matches_edm_recursion():
    u = iddpm.u_grid()
    expected = np_u_grid()
    np.testing.assert_allclose(u, expected, rtol=1e-13, atol=0)
    assert u.shape == (1001,) and u[-1] == 0 and np.all(np.diff(u) < 0)
    assert iddpm.sigma_min() == expected[999] and iddpm.sigma_max() == expected[0]
    np.testing.assert_allclose(iddpm.alpha_bar(np.arange(1001)), np.sin(0.5 * np.pi * np.arange(1001) / 1000 / 1.008)
                               ** 2, rtol=1e-15)
    other = iddpm.u_grid(M=50, C_1=0.01, C_2=0.02)
    np.testing.assert_allclose(other, np_u_grid(50, 0.01, 0.02), rtol=1e-13)


def test_iddpm_round_sigma_and_c_noise():
    u = np_u_grid()
    u32 = u.astype(np.float32)
    rng = np.random.default_rng(0)
    sigma = np.concatenate([np.exp(rng.uniform(np.log(1e-3), np.log(3e4), 500)), u[:-1], [0.0, 1e5]]).astype(
        np.float32)
    index = np.argmin(np.abs(sigma[:, None].astype(np.float64) - u32[None, :].astype(np.float64)), axis=1)
    np.testing.assert_array_equal(iddpm.round_index(jnp.asarray(sigma)), index)
    np.testing.assert_array_equal(iddpm.round_sigma(jnp.asarray(sigma)), u32[index])
    np.testing.assert_array_equal(iddpm.noise_label(jnp.asarray(sigma)), (999 - index).astype(np.float32))
    # every grid level rounds to itself: c_noise = M - 1 - j; 0 is u_M (c_noise -1), beyond u_0 is u_0 (999)
    np.testing.assert_array_equal(iddpm.noise_label(jnp.asarray(u32[:-1])), 999 - np.arange(1000))
    assert float(iddpm.noise_label(0.0)) == -1 and float(iddpm.noise_label(1e5)) == 999
    assert iddpm.round_sigma(jnp.ones((2, 3))).shape == (2, 3)
    # jittable
    np.testing.assert_array_equal(jax.jit(iddpm.noise_label)(jnp.asarray(sigma)), 999 - index)


def test_iddpm_coefficients():
    sigma = jnp.asarray([0.01, 0.5, 2.0, 80.0])
    c = iddpm.precond(sigma)
    s = np.asarray(sigma, np.float64)
    np.testing.assert_array_equal(c.c_skip, np.ones(4))
    np.testing.assert_allclose(c.c_out, -s, rtol=1e-7)
    np.testing.assert_allclose(c.c_in, 1 / np.sqrt(s ** 2 + 1), rtol=1e-6)
    u = np_u_grid().astype(np.float32)
    np.testing.assert_array_equal(c.c_noise, 999 - np.argmin(np.abs(s[:, None] - u[None]), axis=1))


def test_iddpm_sampling_grid_is_edms():
    u = np_u_grid()
    low, high = max(0.002, u[999]), min(81.0, u[0])
    filtered = u[(u >= low) & (u <= high)]
    for num_steps in (2, 18, 50, 256):
        expected = filtered[np.round((len(filtered) - 1) / (num_steps - 1) * np.arange(num_steps)).astype(int)]
        grid = iddpm.sigmas(num_steps)
        assert grid.shape == (num_steps + 1,) and grid[-1] == 0
        np.testing.assert_array_equal(grid[:-1], expected)
        assert np.all(np.diff(grid) < 0)
    everything = iddpm.sigmas()
    np.testing.assert_array_equal(everything[:-1], filtered)
    assert everything[0] < 81 and everything[-2] == u[999]
    np.testing.assert_array_equal(iddpm.sigmas(5, sigma_min=0.1, sigma_max=10.0)[:-1],
                                  iddpm.sigmas(5, sigma_min=0.1, sigma_max=10.0)[:-1])
    assert np.all(np.isin(iddpm.sigmas(7, sigma_min=0.1, sigma_max=10.0)[:-1], u))
    with pytest.raises(ValueError, match='num_steps'):
        iddpm.sigmas(0)


# ---------------------------------------------------------------------------------------------- (c) forward passes

@pytest.fixture(scope='module')
def unet32():
    kind, fields = UNET32
    model = convert.build_model(kind, fields)
    return model, random_variables(model, seed=1)


def test_unet32_forward_under_jit(unet32):
    model, variables = unet32
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    c_noise = jnp.asarray([5.0, 900.0])
    forward = jax.jit(lambda v, x, c, y: model.apply(v, x, c, y, mutable=['intermediates']))
    out, state = forward(variables, x, c_noise, one_hot([3, 7], 10))
    assert out.shape == (2, 32, 32, 6) and out.dtype == jnp.float32      # learn_sigma: 2C channels
    assert np.all(np.isfinite(out)) and np.std(out) > 0
    assert state['intermediates']['bottleneck'][0].shape == (2, 8, 8, 64)
    # the class embedding is a table row: another label changes that example's output only
    other, _ = forward(variables, x, c_noise, one_hot([4, 7], 10))
    assert not np.allclose(other[0], out[0]) and np.allclose(other[1], out[1], atol=1e-6)


def test_unet_as_iddpm_denoiser(unet32):
    model, variables = unet32
    labels = one_hot([1, 2], 10)
    x = 3.0 * jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    F = jax.jit(lambda x_in, c_noise: model.apply(variables, x_in, c_noise, labels))
    D = iddpm.denoiser(F)
    sigma = jnp.asarray([0.5, 3.0])
    d = D(x, sigma)
    assert d.shape == x.shape and d.dtype == jnp.float32
    # D = x - sigma F(x / sqrt(sigma^2 + 1), M - 1 - j)[..., :3], j the nearest level
    c_noise = 999.0 - np.argmin(np.abs(np.asarray(sigma)[:, None] - np_u_grid().astype(np.float32)[None]), axis=1)
    F_x = F(x / jnp.sqrt(sigma ** 2 + 1)[:, None, None, None], jnp.asarray(c_noise, jnp.float32))
    assert F_x.shape == (2, 32, 32, 6)
    np.testing.assert_allclose(d, x - sigma[:, None, None, None] * F_x[..., :3], rtol=1e-5, atol=1e-5)
    # a scalar sigma is that sigma for every example
    np.testing.assert_array_equal(D(x, 0.5), D(x, jnp.asarray([0.5, 0.5])))
    # models/denoiser.py's Denoiser on the output's mean part: the same D, jitted, and its aux
    denoiser = Denoiser(iddpm.mean_channels(model.apply, 3), variables['params'], iddpm.precond,
                        class_labels=labels)
    np.testing.assert_allclose(jax.jit(denoiser.__call__)(x, sigma), d, rtol=1e-5, atol=1e-5)
    d_aux, aux = jax.jit(denoiser.with_aux)(x, sigma)
    np.testing.assert_allclose(d_aux, d, rtol=1e-5, atol=1e-5)
    assert aux['bottleneck'].shape == (2, 8, 8, 64)


def test_full_size_configs_by_shape_only():
    """iDDPM's CIFAR-10 UNet (Nichol & Dhariwal 2021: 128 channels, 3 blocks, attention at 16 and 8, 4 heads,
    learn_sigma) and the 32x32 class-conditional ADM with resblock up/down; parameter counts of guided-diffusion's
    UNetModel with the same arguments. Also the released 64x64 checkpoints' presets."""
    cases = [
        (convert.unet_fields(image_size=32, num_channels=128, num_res_blocks=3, learn_sigma=True, dropout=0.3,
                             attention_resolutions='16,8', num_heads=4, use_scale_shift_norm=True), 52_546_438),
        (convert.unet_fields(image_size=32, num_channels=128, num_res_blocks=3, learn_sigma=True, dropout=0.1,
                             class_cond=True, num_classes=10, attention_resolutions='16,8', num_heads=4,
                             use_scale_shift_norm=True, resblock_updown=True), 57_099_782),
    ]
    for fields, count in cases:
        model = convert.build_model('unet', fields)
        x = jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.float32)
        c = jax.ShapeDtypeStruct((4,), jnp.float32)
        variables = jax.eval_shape(lambda x, c: model.init(jax.random.key(0), x, c), x, c)
        assert sum(leaf.size for leaf in jax.tree_util.tree_leaves(variables['params'])) == count
        out = jax.eval_shape(lambda v, x, c: model.apply(v, x, c), variables, x, c)
        assert out.shape == (4, 32, 32, 6)
    # counts of guided-diffusion's own modules built with the README's flags
    for name, count in (('64x64_diffusion', 295_904_454), ('64x64_classifier', 65_438_568),
                        ('32x32_classifier', 47_771_112)):
        shapes = convert.torch_shapes(convert.build_model(convert.PRESETS[name]['kind'],
                                                          convert.PRESETS[name]['fields']))
        assert sum(int(np.prod(s)) for s in shapes.values()) == count, name


# ---------------------------------------------------------------------------------------------- (a) import / export

def _torch_state_dict(model, seed):
    torch = pytest.importorskip('torch')
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in convert.torch_shapes(model).items()}


@pytest.mark.parametrize('network', sorted(NETWORKS))
def test_torch_file_round_trip(network, tmp_path):
    torch = pytest.importorskip('torch')
    kind, fields = NETWORKS[network]
    model = convert.build_model(kind, fields)
    state_dict = _torch_state_dict(model, seed=len(network))
    path = str(tmp_path / f'{network}.pt')
    torch.save(state_dict, path)
    loaded = convert.load(path, kind=kind, fields=fields)
    assert loaded.kind == kind and loaded.data_shape == (fields['img_resolution'],) * 2 + (3,)
    # every key maps to exactly one jaxdiff variable of the same size, nothing left on either side
    flat = traverse_util.flatten_dict(loaded.variables['params'])
    expected = traverse_util.flatten_dict(convert.variable_shapes(model)['params'])
    assert set(flat) == set(expected)
    names = {convert.torch_name(path): path for path in flat}
    assert len(names) == len(flat) and set(names) == set(state_dict)
    for name, path in names.items():
        assert flat[path].shape == expected[path].shape
        assert flat[path].size == state_dict[name].numel()
    # export(import(sd)) == sd, bit for bit
    exported = convert.state_dict_from_variables(loaded.variables)
    assert set(exported) == set(state_dict)
    for name, value in state_dict.items():
        assert exported[name].shape == tuple(value.shape), name
        np.testing.assert_array_equal(exported[name], value.numpy(), err_msg=name)


def test_npz_and_preset_by_file_name(tmp_path):
    kind, fields = UNET32
    model = convert.build_model(kind, fields)
    variables = random_variables(model, seed=3)
    state_dict = convert.state_dict_from_variables(variables)
    path = str(tmp_path / '64x64_diffusion.npz')    # a preset name: its fields, here overridden by small ones
    np.savez(path, **state_dict)
    loaded = convert.load(path, fields=fields)
    assert loaded.info['preset'] == '64x64_diffusion' and loaded.info['noise_schedule'] == 'cosine'
    assert loaded.model_fields['name'] == 'adm' and loaded.model_fields['learn_sigma']
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.variables, variables)


def test_presets_follow_the_readme_flags():
    unet = convert.PRESETS['64x64_diffusion']['fields']
    assert (unet['model_channels'], unet['num_res_blocks'], unet['num_head_channels'], unet['channel_mult'],
            unet['attention_resolutions'], unet['label_dim'], unet['dropout']) == (192, 3, 64, (1, 2, 3, 4),
                                                                                    (2, 4, 8), 1000, 0.1)
    assert unet['learn_sigma'] and unet['use_new_attention_order'] and unet['resblock_updown']
    dg = convert.PRESETS['32x32_classifier']['fields']
    assert (dg['model_channels'], dg['num_res_blocks'], dg['channel_mult'], dg['attention_resolutions'],
            dg['pool'], dg['out_channels']) == (128, 4, (1, 2, 4), (1, 2, 4), 'attention', 1000)


# ---------------------------------------------------------------------------------------------- (d) errors

def _one_line(excinfo):
    message = str(excinfo.value)
    assert '\n' not in message, message
    return message


def test_errors_are_one_line(tmp_path):
    kind, fields = CLASSIFIER
    model = convert.build_model(kind, fields)
    good = convert.state_dict_from_variables(random_variables(model))

    with pytest.raises(UserError) as e:
        convert.load(str(tmp_path / 'missing.pt'), kind=kind, fields=fields)
    assert 'does not exist' in _one_line(e)

    garbage = tmp_path / 'garbage.pt'
    garbage.write_bytes(os.urandom(256))
    with pytest.raises(UserError) as e:
        convert.load(str(garbage), kind=kind, fields=fields)
    assert str(garbage) in _one_line(e)

    bad_npz = tmp_path / 'bad.npz'
    bad_npz.write_bytes(b'not a zip')
    with pytest.raises(UserError) as e:
        convert.load(str(bad_npz), kind=kind, fields=fields)
    assert 'bad.npz' in _one_line(e)

    unknown = tmp_path / 'unknown.npz'
    np.savez(unknown, **good)
    with pytest.raises(UserError) as e:
        convert.load(str(unknown))                     # neither a preset name nor fields
    assert 'preset' in _one_line(e)

    # another network's state dict (EDM names): no key matches
    with pytest.raises(UserError) as e:
        convert.variables_from_state_dict({'model.enc.32x32_conv.weight': np.zeros((128, 3, 3, 3))}, model, 'f.pt')
    assert 'not a guided-diffusion classifier' in _one_line(e)

    # a missing and an extra key
    missing = dict(good)
    del missing['out.2.c_proj.bias']
    with pytest.raises(UserError) as e:
        convert.variables_from_state_dict(missing, model, 'f.pt')
    assert 'out.2.c_proj.bias' in _one_line(e)
    extra = {**good, 'label_emb.weight': np.zeros((10, 128), np.float32)}
    with pytest.raises(UserError) as e:
        convert.variables_from_state_dict(extra, model, 'f.pt')
    assert 'label_emb.weight' in _one_line(e)

    # a shape mismatch names the key and both shapes
    wrong = dict(good)
    wrong['input_blocks.0.0.weight'] = np.zeros((32, 3, 5, 5), np.float32)
    with pytest.raises(UserError) as e:
        convert.variables_from_state_dict(wrong, model, 'f.pt')
    message = _one_line(e)
    assert 'input_blocks.0.0.weight' in message and '(32, 3, 5, 5)' in message and '(32, 3, 3, 3)' in message

    # a preset of the other kind, and bad fields
    with pytest.raises(UserError) as e:
        convert.load(str(unknown), preset='64x64_diffusion', kind='classifier')
    _one_line(e)
    with pytest.raises(UserError) as e:
        convert.build_model('unet', {**UNET32[1], 'model_channels': 20})
    assert 'multiple of 32' in _one_line(e)


def test_torch_file_that_is_not_a_state_dict(tmp_path):
    torch = pytest.importorskip('torch')
    kind, fields = CLASSIFIER
    path = str(tmp_path / 'list.pt')
    torch.save([torch.zeros(3)], path)
    with pytest.raises(UserError) as e:
        convert.load(path, kind=kind, fields=fields)
    assert 'not a state dict' in _one_line(e)
    path = str(tmp_path / 'ints.pt')
    model = convert.build_model(kind, fields)
    torch.save({name: torch.zeros(shape, dtype=torch.int64) for name, shape in convert.torch_shapes(model).items()},
               path)
    with pytest.raises(UserError) as e:
        convert.load(path, kind=kind, fields=fields)
    assert 'dtype' in _one_line(e)


# ---------------------------------------------------------------------------------------------- the authors' code

def test_outputs_match_guided_diffusion_pytorch():
    """Only where guided-diffusion is importable: the same random weights in the authors' UNetModel /
    EncoderUNetModel and in jaxdiff's networks give the same outputs (relative error <= 1e-5, float32)."""
    torch = pytest.importorskip('torch')
    unet = pytest.importorskip('guided_diffusion.unet')
    for name, (kind, fields) in sorted(NETWORKS.items()):
        kwargs = dict(image_size=fields['img_resolution'], in_channels=fields['in_channels'],
                      model_channels=fields['model_channels'], num_res_blocks=fields['num_res_blocks'],
                      attention_resolutions=fields['attention_resolutions'], dropout=fields['dropout'],
                      channel_mult=fields['channel_mult'], num_heads=fields['num_heads'],
                      num_head_channels=fields['num_head_channels'],
                      use_scale_shift_norm=fields['use_scale_shift_norm'], resblock_updown=fields['resblock_updown'],
                      use_new_attention_order=fields['use_new_attention_order'])
        if kind == 'unet':
            theirs = unet.UNetModel(out_channels=6, num_classes=fields['label_dim'] or None,
                                    num_heads_upsample=fields['num_heads_upsample'], **kwargs)
        else:
            theirs = unet.EncoderUNetModel(out_channels=fields['out_channels'], pool=fields['pool'], **kwargs)
        theirs.eval()
        model = convert.build_model(kind, fields)
        variables = random_variables(model, seed=7)
        theirs.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in
                                convert.state_dict_from_variables(variables).items()})
        x = np.asarray(jax.random.normal(jax.random.key(8), (2, fields['img_resolution'], fields['img_resolution'],
                                                             3)))
        t = np.asarray([4.0, 870.0], np.float32)
        extra, labels = {}, None
        if fields.get('label_dim'):
            extra['y'] = torch.tensor([2, 9])
            labels = one_hot([2, 9], fields['label_dim'])
        with torch.no_grad():
            expected = theirs(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t), **extra).numpy()
        out = np.asarray(model.apply(variables, jnp.asarray(x), jnp.asarray(t), labels))
        if out.ndim == 4:
            out = out.transpose(0, 3, 1, 2)
        assert_close(out, expected, rtol=1e-5)
