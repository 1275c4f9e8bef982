"""pytorch-fid's Inception-v3 weights as the variables of `jaxdiff.models.inception.InceptionV3`.

The file is pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (a `torch.save`d state dict; read without torch by
`torch_file`) or an `.npz` holding the same arrays under the same names. Name mapping (torchvision's layout, which
`InceptionV3` mirrors module by module):
  <module>.conv.weight [O, I, kH, kW]    -> params      <module>/conv/kernel [kH, kW, I, O]
  <module>.bn.weight / .bn.bias           -> params      <module>/bn/scale, <module>/bn/bias
  <module>.bn.running_mean / running_var  -> batch_stats <module>/bn/mean, <module>/bn/var
  <module>.bn.num_batches_tracked, fc.*   -> unused (training counter; the 1008-way classifier)
"""
import os

import numpy as np
from flax import traverse_util

from jaxdiff.convert import torch_file
from jaxdiff.core.errors import UserError
from jaxdiff.models import inception

WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'
WEIGHTS_URL = f'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}'
# Looked in, in order, when no path is given: jaxdiff's cache, then where pytorch-fid's own download lands.
DEFAULT_LOCATIONS = (os.path.join('~', '.cache', 'jaxdiff', WEIGHTS_FILE),
                     os.path.join('~', '.cache', 'torch', 'hub', 'checkpoints', WEIGHTS_FILE))
_UNUSED = ('num_batches_tracked',)


def default_path():
    """The first of DEFAULT_LOCATIONS that exists (or the first one, for the error message)."""
    for location in DEFAULT_LOCATIONS:
        path = os.path.expanduser(location)
        if os.path.isfile(path):
            return path
    return os.path.expanduser(DEFAULT_LOCATIONS[0])


def missing_message(path):
    return (f'Inception weights {path} not found: download {WEIGHTS_FILE} from {WEIGHTS_URL} '
            f'(e.g. `mkdir -p ~/.cache/jaxdiff && wget -P ~/.cache/jaxdiff {WEIGHTS_URL}`) or pass an .npz of '
            'the same arrays')


def read_state_dict(path):
    """{torch name: array} from a .pth (torch.save) or .npz file."""
    if not os.path.isfile(path):
        raise UserError(missing_message(path))
    if path.endswith('.npz'):
        with np.load(path) as arrays:
            return {name: arrays[name] for name in arrays.files}
    return torch_file.state_dict(torch_file.load(path), origin=path)


def flax_name(torch_name):
    """('params' | 'batch_stats', flax path tuple) for a torch name, or None for an unused entry."""
    *module, leaf = torch_name.split('.')
    if module[:1] == ['fc'] or leaf in _UNUSED:
        return None
    if module[-1] == 'conv' and leaf == 'weight':
        return 'params', (*module, 'kernel')
    if module[-1] == 'bn':
        collection, name = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
                            'running_mean': ('batch_stats', 'mean'),
                            'running_var': ('batch_stats', 'var')}.get(leaf, (None, None))
        if name:
            return collection, (*module, name)
    raise UserError(f'Inception weights: unexpected entry {torch_name!r} (not pytorch-fid\'s FID Inception)')


def torch_name(collection, path):
    """The inverse of `flax_name` (used to write weight files in tests)."""
    *module, leaf = path
    if leaf == 'kernel':
        return '.'.join(module + ['weight'])
    return '.'.join(module + [{('params', 'scale'): 'weight', ('params', 'bias'): 'bias',
                               ('batch_stats', 'mean'): 'running_mean',
                               ('batch_stats', 'var'): 'running_var'}[(collection, leaf)]])


def to_torch_layout(collection, path, value):
    """A flax variable as the torch array it came from (HWIO kernels back to OIHW)."""
    value = np.asarray(value)
    return value.transpose(3, 2, 0, 1) if path[-1] == 'kernel' else value


def variables_from_state_dict(state_dict, origin='Inception weights'):
    """{'params', 'batch_stats'} for InceptionV3 from a pytorch-fid state dict; every variable must be present
    with its shape (a UserError names the first missing or mis-shaped one)."""
    expected = {collection: traverse_util.flatten_dict(tree)
                for collection, tree in inception.variable_shapes().items()}
    flat = {collection: {} for collection in expected}
    for name, value in state_dict.items():
        target = flax_name(name)
        if target is None:
            continue
        collection, path = target
        value = np.asarray(value, np.float32)
        if path[-1] == 'kernel':
            value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        if path not in expected[collection]:
            raise UserError(f'{origin}: {name} has no place in the FID Inception network')
        if value.shape != expected[collection][path].shape:
            raise UserError(f'{origin}: {name} has shape {value.shape}, expected {expected[collection][path].shape}')
        flat[collection][path] = value
    for collection, paths in expected.items():
        missing = sorted(set(paths) - set(flat[collection]))
        if missing:
            raise UserError(f'{origin}: {len(missing)} weights missing, e.g. '
                            f'{torch_name(collection, missing[0])}')
    return {collection: traverse_util.unflatten_dict(tree) for collection, tree in flat.items()}


def load(path=None):
    """InceptionV3 variables from `path` (.pth or .npz; None: `default_path()`). A missing file is one UserError
    line naming the file and where to download it."""
    path = os.path.expanduser(os.fspath(path)) if path is not None else default_path()
    return variables_from_state_dict(read_state_dict(path), origin=path)


def random_state_dict(seed=0):
    """A state dict with pytorch-fid's names and shapes and random values whose activations stay O(1) through the
    network (He-scaled kernels, BatchNorm near the identity), plus its unused entries (num_batches_tracked, fc):
    for tests and smoke runs without the real weights (`np.savez(path, **random_state_dict())`)."""
    rng = np.random.default_rng(seed)
    state = {}
    for collection, tree in inception.variable_shapes().items():
        for path, leaf in traverse_util.flatten_dict(tree).items():
            name = torch_name(collection, path)
            if path[-1] == 'kernel':
                kh, kw, cin, cout = leaf.shape
                value = rng.normal(0, np.sqrt(2 / (kh * kw * cin)), (cout, cin, kh, kw))
            elif path[-1] in ('scale', 'var'):
                value = rng.uniform(0.5, 1.5, leaf.shape)
            else:
                value = rng.uniform(-0.2, 0.2, leaf.shape)
            state[name] = value.astype(np.float32)
            if name.endswith('bn.weight'):
                state[name[:-len('weight')] + 'num_batches_tracked'] = np.array(0, np.int64)
    state['fc.weight'] = rng.normal(0, 0.02, (1008, inception.FEATURE_DIM)).astype(np.float32)
    state['fc.bias'] = np.zeros(1008, np.float32)
    return state


def save_npz(variables, path):
    """Writes variables as an .npz with pytorch-fid's names and layouts (loadable by `load`)."""
    arrays = {}
    for collection, tree in variables.items():
        for flat_path, value in traverse_util.flatten_dict(tree).items():
            arrays[torch_name(collection, flat_path)] = to_torch_layout(collection, flat_path, value)
    np.savez(path, **arrays)
