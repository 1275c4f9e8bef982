"""EDM's networks (Karras et al. 2022, github.com/NVlabs/edm) as jaxdiff SongUNets.

    network = edm.load('edm-cifar10-32x32-cond-vp.pkl')        # or network-snapshot-*.pkl, or a state dict file
    network.model_fields     # config.model: {'name': 'ddpmpp', 'model_channels': 128, ..., 'label_dim': 10}
    network.data_shape       # config.data.shape, (32, 32, 3)
    network.loss             # config.loss: {'parameterization': 'vp', 'beta_d': 19.9, ...} (the preconditioning)
    network.variables        # {'params': ..., and 'buffers' for NCSN++'s Fourier frequencies}
    model = models.build(network.model_fields.pop('name'), **network.model_fields)   # what apply expects

Sources:
  EDM pickles  `network-snapshot-*.pkl` and EDM's published models are pickles of a dict whose 'ema' entry is the
               preconditioned network (EDMPrecond / VPPrecond / VEPrecond around a SongUNet). EDM pickles its
               classes through `torch_utils.persistence`, which stores each object as
               `_reconstruct_persistent_obj(meta)` with meta = {type, version, module_src, class_name, state}; the
               unpickler here resolves that name itself and keeps class_name and state, so neither EDM's repository
               nor its embedded source is needed (nor executed), and tensors are read as NumPy arrays
               (`torch_file`), so torch is not needed either. The preconditioning class and its constants (beta_d,
               beta_min, M, epsilon_t / sigma_min, sigma_max / sigma_data) come from the pickled object.
  state dicts  a `torch.save`d state dict (.pt / .pth) or an .npz with EDM's names, of the preconditioned network
               ('model.' prefix) or of the SongUNet alone; the preconditioning is then an argument.

Mapping (jaxdiff's SongUNet mirrors EDM's module names): `model.enc.16x16_down.norm0.weight` ->
params['enc_16x16_down']['norm0']['scale']; `model.map_layer0.weight` -> params['map_layer0']['kernel']. Linear
weights [out, in] are transposed; conv weights OIHW become HWIO; GroupNorm `weight` is the scale; attention qkv
keeps EDM's channel layout [head, channel, (q, k, v)], which jaxdiff's attention uses. Buffers: the resampling
filters (`resample_filter`, f f^T / (sum f)^2) are constants of the architecture (checked, not stored);
NCSN++'s Fourier frequencies `model.map_noise.freqs` become the variable that jaxdiff's SongUNet keeps for them
outside 'params'. The architecture (channels, levels, blocks, attention, embedding, encoder / decoder types, labels,
augmentation) is read from the names and shapes.
"""
import collections
import dataclasses
import os
import pickle
import re
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxdiff.convert import torch_file
from jaxdiff.core.errors import UserError

PRECONDITIONINGS = ('EDMPrecond', 'VPPrecond', 'VEPrecond')
PARAMETERIZATION_OF = {'EDMPrecond': 'edm', 'VPPrecond': 'vp', 'VEPrecond': 've'}
# EDM's defaults (training/networks.py and training/loss.py) for what a pickle or the caller does not give.
PRECOND_DEFAULTS = {'edm': dict(sigma_data=0.5, P_mean=-1.2, P_std=1.2),
                    'vp': dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5),
                    've': dict(sigma_min=0.02, sigma_max=100.0)}
DEFAULT_FILTERS = {'positional': (1, 1), 'fourier': (1, 3, 3, 1)}  # EDM's DDPM++ / NCSN++ presets
# SongUNet fields an EDM network's construction arguments may carry (read from the pickle when present).
_KWARG_FIELDS = ('dropout', 'label_dropout')
_SHAPE_FIELDS = ('img_resolution', 'in_channels', 'out_channels')


@dataclasses.dataclass
class Network:
    """A converted EDM network: what a jaxdiff config and checkpoint need."""
    model_fields: dict       # config.model, including 'name' ('ddpmpp' for positional, 'ncsnpp' for Fourier)
    data_shape: tuple        # config.data.shape (R, R, C)
    loss: dict               # config.loss: the parameterization and its constants
    variables: dict          # {'params': ..., plus the model's other collections, e.g. 'buffers'}
    info: dict = dataclasses.field(default_factory=dict)   # class_name, sigma_min / sigma_max, source


# ---------------------------------------------------------------------------------------------- EDM pickles

class PersistentObject:
    """An object EDM pickled through torch_utils.persistence: its class name and state (its __dict__)."""

    def __init__(self, class_name, state):
        self.class_name = class_name
        self.state = state

    def __repr__(self):
        return f'<EDM {self.class_name}>'


def _reconstruct_persistent_obj(meta):
    if not isinstance(meta, dict) or meta.get('type') != 'class':
        raise UserError(f'EDM pickle: unsupported persistent object {type(meta).__name__}')
    return PersistentObject(meta.get('class_name'), dict(meta.get('state') or {}))


class EasyDict(dict):
    """dnnlib.util.EasyDict, as a plain dict."""


EDM_GLOBALS = {
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _reconstruct_persistent_obj,
    ('dnnlib.util', 'EasyDict'): EasyDict,
    ('torch', 'Size'): tuple,
    ('torch', 'device'): lambda *args: ':'.join(map(str, args)),
}


def read_pickle(path):
    """The object of an EDM pickle, persistent objects as PersistentObject, tensors as NumPy arrays."""
    try:
        return torch_file.load_pickle(path, EDM_GLOBALS)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        if isinstance(error, UserError):
            raise
        raise UserError(f'{path} is not a readable EDM pickle ({type(error).__name__}: {error})') from None


def _state_of(node):
    if isinstance(node, PersistentObject):
        return node.state
    if isinstance(node, torch_file.TorchModuleState):
        return node.state
    return None


def module_state_dict(node, prefix=''):
    """{dotted name: array} of a pickled torch module tree: its parameters and persistent buffers, recursively
    (what torch's `state_dict()` returns for it)."""
    state = _state_of(node)
    if state is None:
        raise UserError(f'EDM pickle: {prefix or "the network"} is not a torch module')
    out = {}
    for name, value in (state.get('_parameters') or {}).items():
        if value is not None:
            out[prefix + name] = np.asarray(value)
    skip = set(state.get('_non_persistent_buffers_set') or ())
    for name, value in (state.get('_buffers') or {}).items():
        if value is not None and name not in skip:
            out[prefix + name] = np.asarray(value)
    for name, child in (state.get('_modules') or {}).items():
        if child is not None:
            out.update(module_state_dict(child, f'{prefix}{name}.'))
    return out


def _plain(value):
    """Constants of a pickled object as Python numbers (NumPy scalars from EDM's np.sqrt etc.)."""
    if isinstance(value, np.ndarray) and value.ndim == 0 or isinstance(value, np.generic):
        return value.item()
    return value


def precond_loss(class_name, constants, loss_constants=None):
    """config.loss for EDM's preconditioning `class_name` (EDMPrecond / VPPrecond / VEPrecond) with its constants
    (the pickled object's attributes); `loss_constants` (the pickled loss_fn's) fill P_mean / P_std for EDM."""
    if class_name not in PARAMETERIZATION_OF:
        raise UserError(f'EDM network with preconditioning {class_name!r}: jaxdiff imports '
                        f'{", ".join(PRECONDITIONINGS)} (iDDPMPrecond / ADM networks are not SongUNets)')
    parameterization = PARAMETERIZATION_OF[class_name]
    values = {**(loss_constants or {}), **constants}
    loss = dict(parameterization=parameterization, target='x0', pairing='independent')
    for name, default in PRECOND_DEFAULTS[parameterization].items():
        value = _plain(values.get(name, default))
        loss[name] = int(value) if name == 'M' else float(value)
    return loss


def _network_of(obj, origin):
    """The preconditioned network inside an EDM pickle (its 'ema' entry, or the object itself)."""
    if isinstance(obj, dict):
        for key in ('ema', 'net', 'model'):
            if isinstance(obj.get(key), PersistentObject):
                return obj[key], obj
    if isinstance(obj, PersistentObject):
        return obj, {}
    raise UserError(f'{origin}: no EDM network found (expected a dict with an "ema" network, as EDM saves)')


# ---------------------------------------------------------------------------------------------- architecture

def _strip(state_dict):
    """Names relative to the SongUNet (drops the preconditioning wrapper's 'model.' prefix)."""
    if any(name.startswith('model.') for name in state_dict):
        return {name[len('model.'):]: value for name, value in state_dict.items() if name.startswith('model.')}
    return dict(state_dict)


def _filter_taps(buffer):
    """The 1-D filter f of a resample_filter buffer f f^T / (sum f)^2, scaled so that f[0] = 1 (EDM's
    filters are small integers: [1, 1], [1, 3, 3, 1])."""
    taps = np.asarray(buffer, np.float64).reshape(buffer.shape[-2:])
    row = taps[0] / taps[0, 0]
    rounded = np.round(row)
    return tuple(int(v) for v in rounded) if np.allclose(row, rounded, atol=1e-4) else tuple(float(v) for v in row)


def songunet_fields(state_dict, overrides=None, origin='EDM state dict'):
    """The jaxdiff SongUNet fields of an EDM SongUNet, read from its state dict's names and shapes.

    `overrides` (fields) win over what is read; fields the state dict cannot show: dropout and label_dropout
    (0 unless given), resample_filter when the file carries no resampling buffers (EDM's preset for the embedding).
    """
    sd = _strip(state_dict)
    if not any(name.startswith('enc.') for name in sd):
        raise UserError(f'{origin}: no EDM SongUNet encoder (enc.*) in the state dict; names look like '
                        f'{", ".join(sorted(sd)[:3])}')
    blocks = collections.defaultdict(set)  # 'enc' / 'dec' -> block keys like '16x16_down'
    for name in sd:
        part, *rest = name.split('.')
        if part in ('enc', 'dec') and rest:
            blocks[part].add(rest[0])
    resolution_of = lambda key: int(key.split('x')[0])
    convs = [key for key in blocks['enc'] if key.endswith('_conv')]
    if len(convs) != 1:
        raise UserError(f'{origin}: expected one input conv enc.RxR_conv, found {convs}')
    img_resolution = resolution_of(convs[0])
    conv_weight = sd[f'enc.{convs[0]}.weight']
    model_channels, in_channels = conv_weight.shape[:2]
    resolutions = sorted({resolution_of(key) for key in blocks['enc']}, reverse=True)
    levels = len(resolutions)
    if resolutions != [img_resolution >> level for level in range(levels)]:
        raise UserError(f'{origin}: encoder resolutions {resolutions} do not halve from {img_resolution}')
    num_blocks = len([key for key in blocks['enc'] if re.fullmatch(rf'{img_resolution}x{img_resolution}_block\d+',
                                                                    key)])
    channel_mult = tuple(int(sd[f'enc.{res}x{res}_block0.conv0.weight'].shape[0]) // int(model_channels)
                         for res in resolutions)
    attn_resolutions = tuple(res for res in resolutions if f'enc.{res}x{res}_block0.qkv.weight' in sd)
    out_channels = int(sd[f'dec.{img_resolution}x{img_resolution}_aux_conv.weight'].shape[0])
    embedding_type = 'fourier' if 'map_noise.freqs' in sd else 'positional'
    layer0 = sd['map_layer0.weight']
    encoders = {key.split('_', 1)[1] for key in blocks['enc'] if '_aux_' in key}
    encoder_type = 'residual' if 'aux_residual' in encoders else 'skip' if 'aux_skip' in encoders else 'standard'
    decoder_type = 'skip' if sum(key.endswith('_aux_conv') for key in blocks['dec']) > 1 else 'standard'
    filters = [value for name, value in sd.items() if name.endswith('.resample_filter')]
    resample_filter = _filter_taps(filters[0]) if filters else DEFAULT_FILTERS[embedding_type]
    fields = dict(img_resolution=img_resolution, in_channels=int(in_channels), out_channels=out_channels,
                  label_dim=int(sd['map_label.weight'].shape[1]) if 'map_label.weight' in sd else 0,
                  augment_dim=int(sd['map_augment.weight'].shape[1]) if 'map_augment.weight' in sd else 0,
                  model_channels=int(model_channels), channel_mult=channel_mult,
                  channel_mult_emb=int(layer0.shape[0]) // int(model_channels), num_blocks=num_blocks,
                  attn_resolutions=attn_resolutions, dropout=0.0, label_dropout=0.0,
                  embedding_type=embedding_type,
                  channel_mult_noise=int(layer0.shape[1]) // int(model_channels),
                  encoder_type=encoder_type, decoder_type=decoder_type, resample_filter=resample_filter)
    fields.update(overrides or {})
    return fields


def build_model(fields):
    """The jaxdiff SongUNet for these fields (imported lazily: convert/ is below models only at call time)."""
    from jaxdiff.models.songunet import SongUNet
    model = SongUNet(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    model.validate()
    return model


def variable_shapes(model):
    """All variable collections of `model` as ShapeDtypeStructs (nothing allocated or compiled)."""
    x = jax.ShapeDtypeStruct((1, model.img_resolution, model.img_resolution, model.in_channels), jnp.float32)
    c = jax.ShapeDtypeStruct((1,), jnp.float32)
    return jax.eval_shape(lambda x, c: model.init(jax.random.key(0), x, c), x, c)


def _freqs_location(shapes):
    """(collection, path) of the Fourier frequencies in a SongUNet's non-trainable collections, or None."""
    for collection, tree in shapes.items():
        if collection == 'params':
            continue
        for path in traverse_util.flatten_dict(tree):
            if 'freq' in path[-1]:
                return collection, path
    return None


# ---------------------------------------------------------------------------------------------- name mapping

def jaxdiff_path(edm_name, ndim):
    """EDM SongUNet name (without 'model.') of an array of rank `ndim` -> jaxdiff param path: enc.KEY / dec.KEY
    become the modules enc_KEY / dec_KEY; `weight` is a GroupNorm 'scale' (rank 1) or a Linear / conv 'kernel'."""
    parts = edm_name.split('.')
    if parts[0] in ('enc', 'dec') and len(parts) > 2:
        parts = [f'{parts[0]}_{parts[1]}'] + parts[2:]
    *module, leaf = parts
    if leaf == 'weight':
        return tuple(module) + ('scale' if ndim == 1 else 'kernel',)
    if leaf == 'bias':
        return tuple(module) + ('bias',)
    raise UserError(f'EDM state dict: unexpected entry {edm_name!r}')


def edm_name(path):
    """jaxdiff param path -> EDM SongUNet name (without 'model.'): the inverse of `jaxdiff_path`."""
    module, leaf = list(path[:-1]), path[-1]
    match = re.fullmatch(r'(enc|dec)_(\d+x\d+_\w+)', module[0])
    if match:
        module = [match.group(1), match.group(2)] + module[1:]
    return '.'.join(module + [{'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}[leaf]])


def to_jaxdiff_array(value):
    """EDM layout -> jaxdiff layout, by rank: Linear [out, in] -> [in, out]; conv OIHW -> HWIO; else as is."""
    value = np.asarray(value, np.float32)
    if value.ndim == 2:
        return value.T
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    return value


def resample_buffers(fields):
    """{EDM name: f f^T / (sum f)^2 [1, 1, k, k]} for every resampling conv of the architecture (EDM keeps these
    buffers in its state dicts; jaxdiff computes them from `resample_filter`)."""
    f = np.asarray(fields['resample_filter'], np.float32)
    taps = (np.outer(f, f) / np.square(f.sum()))[None, None]
    names = []
    levels = len(fields['channel_mult'])
    for level in range(levels):
        res = fields['img_resolution'] >> level
        if level:
            names += [f'enc.{res}x{res}_down.conv0', f'enc.{res}x{res}_down.skip']
            if fields['encoder_type'] == 'skip':
                names.append(f'enc.{res}x{res}_aux_down')
            if fields['encoder_type'] == 'residual':
                names.append(f'enc.{res}x{res}_aux_residual')
        if level < levels - 1:
            names += [f'dec.{res}x{res}_up.conv0', f'dec.{res}x{res}_up.skip']
            if fields['decoder_type'] == 'skip':
                names.append(f'dec.{res}x{res}_aux_up')
    return {f'{name}.resample_filter': taps for name in names}


def variables_from_state_dict(state_dict, model, origin='EDM state dict'):
    """jaxdiff variables of `model` from an EDM SongUNet state dict; every variable must be present with its
    shape, the resampling buffers must agree with model.resample_filter (a UserError names the first problem)."""
    sd = _strip(state_dict)
    shapes = variable_shapes(model)
    expected = traverse_util.flatten_dict(shapes['params'])
    freqs_at = _freqs_location(shapes)
    params = {}
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name not in ('parent', 'name')}
    filters = resample_buffers(fields)
    collections_out = {collection: {} for collection in shapes if collection != 'params'}
    for name, value in sd.items():
        if name.endswith('.resample_filter'):
            if name not in filters or filters[name].shape != np.shape(value) or \
                    not np.allclose(filters[name], value, atol=1e-6):
                raise UserError(f'{origin}: {name} does not match resample_filter={tuple(model.resample_filter)} '
                                'of the architecture')
            continue
        if name == 'map_noise.freqs':
            if freqs_at is None:
                raise UserError(f'{origin}: an NCSN++ network with Fourier frequencies, but jaxdiff\'s SongUNet '
                                'keeps no frequency variable to load them into')
            collection, path = freqs_at
            want = traverse_util.flatten_dict(shapes[collection])[path].shape
            if np.shape(value) != want:
                raise UserError(f'{origin}: {name} has shape {np.shape(value)}, expected {want}')
            collections_out[collection][path] = np.asarray(value, np.float32)
            continue
        array = to_jaxdiff_array(value)
        target = jaxdiff_path(name, array.ndim)
        if target not in expected:
            raise UserError(f'{origin}: {name} has no counterpart in the jaxdiff SongUNet ({"/".join(target)})')
        if array.shape != expected[target].shape:
            raise UserError(f'{origin}: {name} has shape {np.shape(value)}; the jaxdiff SongUNet wants '
                            f'{expected[target].shape} at {"/".join(target)}')
        params[target] = array
    missing = sorted(set(expected) - set(params))
    if missing:
        raise UserError(f'{origin}: {len(missing)} weights missing, e.g. model.{edm_name(missing[0])}')
    for collection, tree in collections_out.items():
        wanted = set(traverse_util.flatten_dict(shapes[collection]))
        if set(tree) != wanted:
            raise UserError(f'{origin}: no value for the jaxdiff {collection} variable(s) '
                            f'{sorted("/".join(p) for p in wanted - set(tree))}')
    variables = {'params': traverse_util.unflatten_dict(params)}
    variables.update({c: traverse_util.unflatten_dict(tree) for c, tree in collections_out.items()})
    return variables


def edm_shapes(model, prefix='model.'):
    """{EDM name: shape} of the state dict EDM would hold for this SongUNet (from shapes alone, nothing allocated)."""
    shapes = variable_shapes(model)
    rank_order = {2: (1, 0), 4: (3, 2, 0, 1)}
    out = {}
    for path, leaf in traverse_util.flatten_dict(shapes['params']).items():
        order = rank_order.get(len(leaf.shape), tuple(range(len(leaf.shape))))
        out[prefix + edm_name(path)] = tuple(leaf.shape[i] for i in order)
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name not in ('parent', 'name')}
    out.update({prefix + name: value.shape for name, value in resample_buffers(fields).items()})
    freqs_at = _freqs_location(shapes)
    if freqs_at is not None:
        collection, path = freqs_at
        out[prefix + 'map_noise.freqs'] = traverse_util.flatten_dict(shapes[collection])[path].shape
    return out


# ---------------------------------------------------------------------------------------------- entry point

def model_config(fields):
    """config.model for the fields: the preset name by embedding ('ddpmpp' / 'ncsnpp') with every architecture
    field given explicitly; the shape fields are left to config.data.shape."""
    name = 'ncsnpp' if fields['embedding_type'] == 'fourier' else 'ddpmpp'
    config = {'name': name}
    config.update({k: v for k, v in fields.items() if k not in _SHAPE_FIELDS})
    return config


def _read_state_dict_file(path):
    if path.endswith('.npz'):
        with np.load(path) as arrays:
            return {name: arrays[name] for name in arrays.files}
    return torch_file.state_dict(torch_file.load(path), origin=path)


def load(path, precond=None, precond_constants=None, overrides=None):
    """A Network from an EDM pickle (.pkl) or state dict file (.pt / .pth / .npz).

    precond: for state dicts (required there): 'edm', 'vp' or 've'; for pickles it is read from the file and a
    given value must agree. precond_constants: overrides of the constants (e.g. {'beta_d': 19.9}).
    overrides: SongUNet fields to force (e.g. {'dropout': 0.13} for fine-tuning).
    """
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise UserError(f'EDM network {path} does not exist (EDM\'s CIFAR-10 models: edm-cifar10-32x32-'
                        '{cond,uncond}-{vp,ve}.pkl from its README, or a training run\'s network-snapshot-*.pkl)')
    info = {'source': path}
    overrides = dict(overrides or {})
    if path.endswith('.pkl') and not zipfile.is_zipfile(path):
        obj = read_pickle(path)
        network, container = _network_of(obj, path)
        if network.class_name not in PARAMETERIZATION_OF:
            precond_loss(network.class_name, {})  # raises the UserError listing what is supported
        parameterization = PARAMETERIZATION_OF[network.class_name]
        if precond is not None and precond != parameterization:
            raise UserError(f'{path} holds a {network.class_name} ({parameterization}), not precond={precond!r}')
        state_dict = module_state_dict(network)
        constants = {k: _plain(v) for k, v in network.state.items() if not k.startswith('_')}
        loss_fn = container.get('loss_fn') if isinstance(container, dict) else None
        loss_constants = ({k: _plain(v) for k, v in loss_fn.state.items()}
                          if isinstance(loss_fn, PersistentObject) else None)
        loss = precond_loss(network.class_name, {**constants, **(precond_constants or {})}, loss_constants)
        init_kwargs = dict(network.state.get('_init_kwargs') or {})
        model_type = init_kwargs.get('model_type', 'SongUNet')
        if model_type != 'SongUNet':
            raise UserError(f'{path}: EDM model_type {model_type!r}; jaxdiff imports SongUNet (DDPM++ / NCSN++)')
        for field in _KWARG_FIELDS:
            if field in init_kwargs and field not in overrides:
                overrides[field] = float(_plain(init_kwargs[field]))
        info.update(class_name=network.class_name, sigma_min=_plain(constants.get('sigma_min')),
                    sigma_max=_plain(constants.get('sigma_max')))
    else:
        state_dict = _read_state_dict_file(path)
        if precond not in PRECOND_DEFAULTS:
            raise UserError(f'{path} is a state dict: say which preconditioning it was trained with, precond= one '
                            f'of {", ".join(PRECOND_DEFAULTS)}')
        class_name = {v: k for k, v in PARAMETERIZATION_OF.items()}[precond]
        loss = precond_loss(class_name, dict(precond_constants or {}))
        info.update(class_name=class_name)
    fields = songunet_fields(state_dict, overrides, origin=path)
    model = build_model(fields)
    variables = variables_from_state_dict(state_dict, model, origin=path)
    data_shape = (fields['img_resolution'], fields['img_resolution'], fields['in_channels'])
    return Network(model_fields=model_config(fields), data_shape=data_shape, loss=loss, variables=variables,
                   info=info)

