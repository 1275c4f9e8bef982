"""EDM import: EDM's names and shapes, exact round trips of synthetic state dicts for DDPM++ / NCSN++ x
conditional / unconditional, EDM-style pickles read without EDM's code, and the errors a user can hit.

The torch-dependent tests (a state dict written by torch.save, a pickle like EDM's) skip without torch:
    pip install torch --index-url https://download.pytorch.org/whl/cpu     (or `pip install -e '.[torch]'`)
"""
import os
import pickle
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import state_dict_from_variables
from jaxdiff.core import losses
from jaxdiff import models
from jaxdiff.convert import edm
from jaxdiff.core.errors import UserError

ARCHS = {  # EDM's --arch presets (train.py), at a small size
    'ddpmpp': dict(embedding_type='positional', channel_mult_noise=1, encoder_type='standard',
                   decoder_type='standard', resample_filter=(1, 1)),
    'ncsnpp': dict(embedding_type='fourier', channel_mult_noise=2, encoder_type='residual',
                   decoder_type='standard', resample_filter=(1, 3, 3, 1)),
    'skip': dict(embedding_type='positional', channel_mult_noise=1, encoder_type='skip', decoder_type='skip',
                 resample_filter=(1, 3, 3, 1)),
}
SMALL = dict(img_resolution=16, in_channels=3, out_channels=3, augment_dim=9, model_channels=16,
             channel_mult=(1, 2), channel_mult_emb=2, num_blocks=1, attn_resolutions=(8,), dropout=0.0,
             label_dropout=0.0)


def small_fields(arch, label_dim):
    return dict(SMALL, label_dim=label_dim, **ARCHS[arch])


def random_variables(model, seed=0):
    """Every variable drawn at random (EDM's near-zero inits would hide layout mistakes in the outputs)."""
    rng = np.random.default_rng(seed)
    draw = lambda leaf: (0.3 * rng.normal(size=leaf.shape)).astype(np.float32)
    return jax.tree_util.tree_map(draw, edm.variable_shapes(model))


def apply(model, variables, label_dim, seed=1):
    key_x, key_c, key_l = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(key_x, (2, model.img_resolution, model.img_resolution, model.in_channels))
    c_noise = jax.random.normal(key_c, (2,))
    labels = jax.nn.one_hot(jax.random.randint(key_l, (2,), 0, label_dim), label_dim) if label_dim else None
    return np.asarray(model.apply(variables, x, c_noise, class_labels=labels))


# Literal names and shapes of EDM's CIFAR-10 networks (train.py --arch=ddpmpp --cond=1 / --arch=ncsnpp --cond=0).
EDM_DDPMPP_COND = {
    'model.map_label.weight': (128, 10), 'model.map_augment.weight': (128, 9), 'model.map_layer0.weight': (512, 128),
    'model.map_layer1.bias': (512,), 'model.enc.32x32_conv.weight': (128, 3, 3, 3),
    'model.enc.32x32_block0.conv0.weight': (256, 128, 3, 3), 'model.enc.32x32_block0.skip.weight': (256, 128, 1, 1),
    'model.enc.32x32_block0.affine.weight': (256, 512), 'model.enc.16x16_down.norm0.weight': (256,),
    'model.enc.16x16_down.conv0.resample_filter': (1, 1, 2, 2), 'model.enc.16x16_block0.qkv.weight': (768, 256, 1, 1),
    'model.enc.16x16_block3.norm2.bias': (256,), 'model.dec.8x8_in0.proj.weight': (256, 256, 1, 1),
    'model.dec.16x16_up.skip.resample_filter': (1, 1, 2, 2), 'model.dec.32x32_block0.conv0.weight': (256, 512, 3, 3),
    'model.dec.32x32_block4.conv0.weight': (256, 384, 3, 3), 'model.dec.32x32_aux_norm.weight': (256,),
    'model.dec.32x32_aux_conv.weight': (3, 256, 3, 3),
}
EDM_NCSNPP_UNCOND = {
    'model.map_layer0.weight': (512, 256), 'model.enc.16x16_aux_residual.weight': (256, 3, 3, 3),
    'model.enc.8x8_aux_residual.weight': (256, 256, 3, 3), 'model.enc.8x8_aux_residual.resample_filter': (1, 1, 4, 4),
    'model.dec.8x8_in1.conv1.weight': (256, 256, 3, 3),
}


def test_edm_names_and_shapes_of_the_cifar10_networks():
    ddpmpp = edm.edm_shapes(models.build('ddpmpp', label_dim=10))
    for name, shape in EDM_DDPMPP_COND.items():
        assert ddpmpp.get(name) == shape, name
    assert 'model.map_noise.freqs' not in ddpmpp
    # EDM's count (55,733,891 unconditional) + map_label (128 x 10 + 128); buffers are not parameters.
    count = lambda shapes: sum(int(np.prod(s)) for n, s in shapes.items() if not n.endswith(('resample_filter',
                                                                                              'freqs')))
    assert count(ddpmpp) == 55_733_891 + 1_408
    ncsnpp = edm.edm_shapes(models.build('ncsnpp'))
    for name, shape in EDM_NCSNPP_UNCOND.items():
        assert ncsnpp.get(name) == shape, name
    assert 'model.map_label.weight' not in ncsnpp and count(ncsnpp) == 56_397_827
    assert ncsnpp['model.map_noise.freqs'] == (128,)       # the NCSN++ draw, a stored buffer (not counted)
    # The mapping of single names, both ways.
    assert edm.jaxdiff_path('enc.16x16_down.norm0.weight', 1) == ('enc_16x16_down', 'norm0', 'scale')
    assert edm.jaxdiff_path('map_layer0.weight', 2) == ('map_layer0', 'kernel')
    assert edm.edm_name(('dec_32x32_aux_conv', 'kernel')) == 'dec.32x32_aux_conv.weight'


@pytest.mark.parametrize('arch', sorted(ARCHS))
@pytest.mark.parametrize('label_dim', [0, 10])
def test_state_dict_round_trip_and_same_output(arch, label_dim):
    fields = small_fields(arch, label_dim)
    model = edm.build_model(fields)
    variables = random_variables(model)
    state_dict = state_dict_from_variables(variables, model)
    assert set(state_dict) == set(edm.edm_shapes(model))
    assert {k: v.shape for k, v in state_dict.items()} == edm.edm_shapes(model)
    # The architecture comes back from names and shapes alone.
    inferred = edm.songunet_fields(state_dict)
    assert inferred == {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in fields.items()}
    converted_model = edm.build_model(inferred)
    converted = edm.variables_from_state_dict(state_dict, converted_model)
    flat, flat_converted = (traverse_util.flatten_dict(v) for v in (variables, converted))
    assert set(flat) == set(flat_converted)
    for path, value in flat.items():
        np.testing.assert_array_equal(np.asarray(value), flat_converted[path], err_msg='/'.join(path))
    np.testing.assert_array_equal(apply(converted_model, converted, label_dim), apply(model, variables, label_dim))


def test_layout_transforms_are_edm_layouts():
    model = edm.build_model(small_fields('ddpmpp', 0))
    variables = random_variables(model)
    sd = state_dict_from_variables(variables, model)
    kernel = np.asarray(variables['params']['enc_16x16_block0']['conv0']['kernel'])       # HWIO
    np.testing.assert_array_equal(sd['model.enc.16x16_block0.conv0.weight'][5, 2, 0, 1], kernel[0, 1, 2, 5])
    dense = np.asarray(variables['params']['map_layer0']['kernel'])                       # [in, out]
    np.testing.assert_array_equal(sd['model.map_layer0.weight'][3, 1], dense[1, 3])
    np.testing.assert_array_equal(sd['model.dec.16x16_aux_norm.weight'],
                                  np.asarray(variables['params']['dec_16x16_aux_norm']['scale']))


def test_npz_state_dict_loads_without_torch(tmp_path):
    fields = small_fields('ddpmpp', 10)
    model = edm.build_model(fields)
    variables = random_variables(model)
    path = tmp_path / 'songunet.npz'
    # The SongUNet's own state dict (no 'model.' prefix) and without the resampling buffers: the filter then
    # comes from EDM's preset for the embedding, (1, 1) for DDPM++.
    np.savez(path, **{k: v for k, v in state_dict_from_variables(variables, model, prefix='').items()
                      if not k.endswith('resample_filter')})
    network = edm.load(path, precond='vp', overrides={'dropout': 0.13})
    assert network.data_shape == (16, 16, 3)
    assert network.model_fields['name'] == 'ddpmpp' and network.model_fields['label_dim'] == 10
    assert network.model_fields['dropout'] == 0.13
    assert network.loss == dict(parameterization='vp', target='x0', pairing='independent', beta_d=19.9,
                                beta_min=0.1, M=1000, epsilon_t=1e-5)
    losses.factory('parameterization', network.loss['parameterization'])(
        **{k: v for k, v in network.loss.items() if k not in ('parameterization', 'target', 'pairing')})
    fields_out = dict(network.model_fields)
    rebuilt = models.build(fields_out.pop('name'), img_resolution=16, in_channels=3, out_channels=3, **fields_out)
    np.testing.assert_array_equal(apply(rebuilt, network.variables, 10), apply(model, variables, 10))
    with pytest.raises(UserError, match='precond= one of edm, vp, ve'):
        edm.load(path)


def test_errors_name_the_problem(tmp_path):
    model = edm.build_model(small_fields('ddpmpp', 0))
    sd = state_dict_from_variables(random_variables(model), model)
    broken = dict(sd)
    del broken['model.enc.16x16_block0.conv1.weight']
    with pytest.raises(UserError, match=r'missing, e.g. model.enc.16x16_block0.conv1.weight'):
        edm.variables_from_state_dict(broken, model)
    wrong_filter = dict(sd, **{'model.enc.8x8_down.skip.resample_filter': np.full((1, 1, 2, 2), 0.3, np.float32)})
    with pytest.raises(UserError, match='resample_filter'):
        edm.variables_from_state_dict(wrong_filter, model)
    with pytest.raises(UserError, match='does not exist'):
        edm.load(tmp_path / 'absent.pkl')
    with pytest.raises(UserError, match='iDDPMPrecond'):
        edm.precond_loss('iDDPMPrecond', {})
    garbage = tmp_path / 'garbage.pkl'
    garbage.write_bytes(b'not a pickle at all')
    with pytest.raises(UserError, match='not a readable EDM pickle'):
        edm.load(garbage)


def test_torch_saved_state_dict(tmp_path):
    torch = pytest.importorskip('torch')
    arch = 'ncsnpp'                  # the Fourier frequencies travel with the state dict
    fields = small_fields(arch, 0)
    model = edm.build_model(fields)
    variables = random_variables(model)
    path = tmp_path / 'state.pt'
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in
                state_dict_from_variables(variables, model).items()}, path)
    network = edm.load(path, precond='ve', precond_constants={'sigma_max': 80.0})
    assert network.loss == dict(parameterization='ve', target='x0', pairing='independent', sigma_min=0.02,
                                sigma_max=80.0)
    np.testing.assert_array_equal(apply(edm.build_model(fields), network.variables, 0), apply(model, variables, 0))


PERSISTENCE_SOURCE = '''
"""A stand-in for EDM's torch_utils.persistence (the facts its pickles rely on): a persistent class pickles as
_reconstruct_persistent_obj(meta), meta = dict(type, version, module_src, class_name, state)."""
import copy


def _reconstruct_persistent_obj(meta):
    raise RuntimeError('EDM code must not be needed to read the pickle')


def persistent_class(orig_class):
    class Decorator(orig_class):
        _orig_module_src = '# the module source EDM embeds'
        _orig_class_name = orig_class.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_args = copy.deepcopy(args)
            self._init_kwargs = copy.deepcopy(kwargs)

        def __reduce__(self):
            fields = list(super().__reduce__())
            fields += [None] * max(3 - len(fields), 0)
            if fields[0] is not _reconstruct_persistent_obj:
                meta = dict(type='class', version=6, module_src=self._orig_module_src,
                            class_name=self._orig_class_name, state=fields[2])
                fields[0] = _reconstruct_persistent_obj
                fields[1] = (meta,)
                fields[2] = None
            return tuple(fields)

    Decorator.__name__ = orig_class.__name__
    return Decorator
'''


def edm_like_pickle(torch, tmp_path, state_dict, precond_class, precond_attributes, init_kwargs):
    """Pickles a torch module tree with EDM's structure (persistent classes, ModuleDicts enc / dec, numpy scalars
    among the attributes) the way EDM's training loop does: pickle.dump(dict(ema=net, loss_fn=..., ...))."""
    package = tmp_path / 'fake_edm' / 'torch_utils'
    package.mkdir(parents=True)
    (package / '__init__.py').write_text('')
    (package / 'persistence.py').write_text(textwrap.dedent(PERSISTENCE_SOURCE))
    sys.path.insert(0, str(tmp_path / 'fake_edm'))
    try:
        from torch_utils import persistence

        def persistent(name):
            init = lambda self, *args, **kwargs: torch.nn.Module.__init__(self)  # EDM's take their fields
            return persistence.persistent_class(type(name, (torch.nn.Module,), {'__init__': init}))

        classes = {name: persistent(name) for name in ('Linear', 'Conv2d', 'GroupNorm', 'UNetBlock', 'SongUNet',
                                                       'FourierEmbedding', 'EDMLoss', 'VPLoss', precond_class)}
        root = classes[precond_class](**init_kwargs)
        for key, value in precond_attributes.items():
            setattr(root, key, value)
        for name, value in state_dict.items():
            *parents, leaf = name.split('.')
            node = root
            for depth, part in enumerate(parents):
                if part not in node._modules:
                    if part in ('enc', 'dec'):
                        child = torch.nn.ModuleDict()
                    else:
                        kind = 'SongUNet' if part == 'model' else 'UNetBlock' if depth == 2 else 'Conv2d'
                        child = classes[kind]()
                        child.skip_scale = np.sqrt(0.5)   # a NumPy scalar, as EDM's UNetBlock holds
                    node.add_module(part, child)
                node = node._modules[part]
            tensor = torch.from_numpy(np.array(value))
            if leaf in ('resample_filter', 'freqs'):
                node.register_buffer(leaf, tensor)
            else:
                node.register_parameter(leaf, torch.nn.Parameter(tensor))
        loss_fn = classes['VPLoss']()
        loss_fn.beta_d, loss_fn.beta_min, loss_fn.epsilon_t = 19.9, 0.1, 1e-5
        path = tmp_path / 'network-snapshot-000000.pkl'
        with open(path, 'wb') as f:
            pickle.dump(dict(ema=root, loss_fn=loss_fn, augment_pipe=None,
                             dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', xflip=False)), f)
    finally:
        sys.path.remove(str(tmp_path / 'fake_edm'))
        for name in [n for n in sys.modules if n == 'torch_utils' or n.startswith('torch_utils.')]:
            del sys.modules[name]
    return path


@pytest.mark.parametrize('arch', ['ddpmpp', 'ncsnpp'])
def test_edm_pickle_without_edm_code(tmp_path, arch):
    torch = pytest.importorskip('torch')
    fields = dict(small_fields(arch, 10), dropout=0.13)   # dropout: read from the pickle's init kwargs
    model = edm.build_model(fields)
    variables = random_variables(model)
    init_kwargs = dict(img_resolution=16, img_channels=3, label_dim=10, use_fp16=False, beta_d=19.9,
                       beta_min=0.1, M=1000, epsilon_t=1e-5, model_type='SongUNet', dropout=0.13,
                       model_channels=16, channel_mult=[1, 2], resample_filter=list(fields['resample_filter']))
    attributes = dict(img_resolution=16, img_channels=3, label_dim=10, use_fp16=False, beta_d=19.9,
                      beta_min=np.float64(0.1), M=1000, epsilon_t=1e-5, sigma_min=0.0064, sigma_max=152.6)
    path = edm_like_pickle(torch, tmp_path, state_dict_from_variables(variables, model), 'VPPrecond',
                           attributes, init_kwargs)
    assert 'torch_utils' not in sys.modules
    network = edm.load(path)
    assert network.loss == dict(parameterization='vp', target='x0', pairing='independent', beta_d=19.9,
                                beta_min=0.1, M=1000, epsilon_t=1e-5)
    assert network.info['class_name'] == 'VPPrecond' and network.info['sigma_max'] == 152.6
    assert network.model_fields['dropout'] == 0.13 and network.model_fields['name'] == arch
    assert network.data_shape == (16, 16, 3)
    np.testing.assert_array_equal(apply(edm.build_model(fields), network.variables, 10),
                                  apply(model, variables, 10))
    with pytest.raises(UserError, match='not precond='):
        edm.load(path, precond='edm')
