"""Reads what `torch.save` writes (and plain pickles holding torch tensors) as NumPy arrays, without torch.

Two layouts exist (facts of torch's serialization format):
  zip     (torch >= 1.6): a zip archive `<name>/data.pkl` (the pickle), `<name>/data/<key>` (one raw storage per
          key), `<name>/byteorder` ('little' when absent). A storage is referenced from the pickle by the
          persistent id ('storage', storage_type, key, location, numel).
  legacy  (`_use_new_zipfile_serialization=False`, torch < 1.6): pickles in a row, magic number, protocol version,
          sys info, the object (persistent id ('storage', storage_type, key, location, numel, view_metadata)), the
          sorted list of storage keys, then for each key an int64 element count and the raw little-endian bytes.
A tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`: a strided view of its storage.
A tensor inside a plain pickle (EDM's network pickles) refers to its storage through
`torch.storage._load_from_bytes(bytes)`, the bytes being a legacy-format `torch.save` of that storage.

The unpickler is restricted: only the globals listed in `SAFE_GLOBALS` (plus those a caller adds) can be named by
the file, so opening a file runs no code from it. Everything comes back as plain Python containers and NumPy arrays.
"""
import collections
import io
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

from jaxdiff.core.errors import UserError

LEGACY_MAGIC_NUMBER = 0x1950a86a20f9469cfc6c
LEGACY_PROTOCOL_VERSION = 1001

# torch's storage class names -> NumPy dtypes.
STORAGE_DTYPES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
    'UntypedStorage': np.uint8, 'ComplexFloatStorage': np.complex64, 'ComplexDoubleStorage': np.complex128,
}
_TORCH_DTYPES = {'float64': np.float64, 'float32': np.float32, 'float16': np.float16, 'bfloat16': ml_dtypes.bfloat16,
                 'int64': np.int64, 'int32': np.int32, 'int16': np.int16, 'int8': np.int8, 'uint8': np.uint8,
                 'bool': np.bool_}


class StorageType:
    """Stands for a torch storage class (`torch.FloatStorage`, ...) inside a persistent id."""

    def __init__(self, name):
        self.name = name
        self.dtype = np.dtype(STORAGE_DTYPES[name])


class TorchDtype:
    """Stands for a `torch.float32`-like dtype object found in a pickle."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f'torch.{self.name}'


class TorchModuleState:
    """A pickled object of a torch class (e.g. `torch.nn.ModuleDict`) kept as its class name and state dict."""

    def __init__(self, *args):
        del args

    def __setstate__(self, state):
        self.__dict__['_state'] = state if isinstance(state, dict) else {'_state': state}

    @property
    def state(self):
        return self.__dict__.get('_state', {})


def _module_state_class(module, name):
    """A TorchModuleState subclass remembering where it came from (class name for messages and tree walks)."""
    return type(name, (TorchModuleState,), {'torch_class': f'{module}.{name}'})


def _tensor(storage, storage_offset, size, stride, *unused):
    """torch._utils._rebuild_tensor_v2: the strided view of `storage` (a 1-D array), copied."""
    del unused
    size, stride = tuple(size), tuple(stride)
    if not size:
        return np.array(storage[storage_offset])
    if any(s == 0 for s in size):
        return np.zeros(size, storage.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= len(storage):
        raise UserError(f'torch file: a tensor of size {size} reads past its storage of {len(storage)} elements')
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[storage_offset:], shape=size,
                                           strides=tuple(s * itemsize for s in stride))
    return np.array(view)


def _tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, *unused):
    """torch._utils._rebuild_tensor_v3 (a dtype argument, an untyped storage)."""
    del requires_grad, backward_hooks, unused
    if isinstance(dtype, TorchDtype):
        storage = storage.view(_TORCH_DTYPES[dtype.name])
    return _tensor(storage, storage_offset, size, stride)


def _parameter(data, *unused):
    """torch._utils._rebuild_parameter(_with_state): a Parameter is its data."""
    del unused
    return data


def _from_type(func, new_type, args, state):
    """torch._tensor._rebuild_from_type_v2: rebuild the plain tensor, drop the subclass and its Python state."""
    del new_type, state
    return func(*args)


def _ordered_dict(*args):
    return collections.OrderedDict(*args)


def _reconstructor(cls, base, state):
    """copyreg._reconstructor, limited to the placeholder classes this module hands out."""
    if not (isinstance(cls, type) and issubclass(cls, (TorchModuleState, dict))):
        raise UserError(f'torch file: refuses to rebuild an object of {cls!r}')
    del base, state
    return cls.__new__(cls)


def _numpy_global(name):
    try:
        from numpy._core import multiarray
    except ImportError:  # NumPy < 2
        from numpy.core import multiarray
    return getattr(multiarray, name)


SAFE_GLOBALS = {
    ('collections', 'OrderedDict'): _ordered_dict,
    ('torch._utils', '_rebuild_tensor_v2'): _tensor,
    ('torch._utils', '_rebuild_tensor_v3'): _tensor_v3,
    ('torch._utils', '_rebuild_parameter'): _parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _parameter,
    ('torch._tensor', '_rebuild_from_type_v2'): _from_type,
    ('torch.nn.parameter', 'Parameter'): _parameter,
    ('copyreg', '_reconstructor'): _reconstructor,
    ('builtins', 'object'): object,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('numpy', 'dtype'): np.dtype,
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy.core.multiarray', 'scalar'): lambda *a: _numpy_global('scalar')(*a),
    ('numpy._core.multiarray', 'scalar'): lambda *a: _numpy_global('scalar')(*a),
    ('numpy.core.multiarray', '_reconstruct'): lambda *a: _numpy_global('_reconstruct')(*a),
    ('numpy._core.multiarray', '_reconstruct'): lambda *a: _numpy_global('_reconstruct')(*a),
}


class Unpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only SAFE_GLOBALS + `extra_globals`, torch storage / dtype names, and torch
    module classes (as TorchModuleState placeholders); storages come from `storage_loader(persistent_id)`."""

    def __init__(self, file, storage_loader=None, extra_globals=None, origin='torch file', legacy=False):
        super().__init__(file)
        self._storage_loader = storage_loader
        self._globals = {**SAFE_GLOBALS, **(extra_globals or {})}
        self._origin = origin
        self._globals[('torch.storage', '_load_from_bytes')] = lambda data: load_bytes(data, origin=origin)
        if legacy:  # a legacy file's storages come after its pickle: tensors are rebuilt once they are read
            self._globals[('torch._utils', '_rebuild_tensor_v2')] = _deferring_tensor

    def find_class(self, module, name):
        if (module, name) in self._globals:
            return self._globals[(module, name)]
        if module == 'torch' and name in STORAGE_DTYPES:
            return StorageType(name)
        if module == 'torch' and name in _TORCH_DTYPES:
            return TorchDtype(name)
        if module.startswith('torch.nn.modules'):
            return _module_state_class(module, name)
        raise UserError(f'{self._origin}: refuses to load {module}.{name} (not a tensor, storage or container; '
                        'jaxdiff reads weights only)')

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise UserError(f'{self._origin}: unknown persistent id {pid!r}')
        if pid[0] == 'module':
            raise UserError(f'{self._origin}: holds a whole pickled torch module; save its state_dict() instead')
        if pid[0] != 'storage' or self._storage_loader is None:
            raise UserError(f'{self._origin}: unexpected persistent id {pid[0]!r}')
        return self._storage_loader(pid)


def _load_zip(archive, origin):
    names = archive.namelist()
    pickles = [n for n in names if n == 'data.pkl' or n.endswith('/data.pkl')]
    if len(pickles) != 1:
        raise UserError(f'{origin}: a zip file without exactly one data.pkl (not written by torch.save)')
    prefix = pickles[0][:-len('data.pkl')]
    byteorder = 'little'
    if prefix + 'byteorder' in names:
        byteorder = archive.read(prefix + 'byteorder').decode().strip()
    cache = {}

    def storage(pid):
        _, storage_type, key, _location, numel = pid[:5]
        if key not in cache:
            dtype = storage_type.dtype.newbyteorder('<' if byteorder == 'little' else '>')
            raw = archive.read(f'{prefix}data/{key}')
            cache[key] = np.frombuffer(raw, dtype=dtype).astype(storage_type.dtype)
        return cache[key]

    with archive.open(pickles[0]) as f:
        return Unpickler(f, storage, origin=origin).load()


def _load_legacy(f, origin):
    def header():
        return pickle.Unpickler(f).load()

    try:
        magic = header()
    except Exception as e:
        raise UserError(f'{origin}: neither a torch zip file nor a legacy torch file ({e})') from None
    if magic != LEGACY_MAGIC_NUMBER:
        raise UserError(f'{origin}: not a torch file (bad magic number)')
    if header() != LEGACY_PROTOCOL_VERSION:
        raise UserError(f'{origin}: unsupported legacy torch protocol version')
    sys_info = header()
    if not sys_info.get('little_endian', True):
        raise UserError(f'{origin}: big-endian legacy torch files are not supported')
    storages = {}  # key -> StorageType; filled while the object is unpickled, the data is read afterwards

    def storage(pid):
        _, storage_type, key, _location, _numel, view_metadata = pid
        storages.setdefault(key, storage_type)
        if view_metadata is None:
            return _StoragePlaceholder(key)
        _view_key, offset, view_size = view_metadata
        return _StoragePlaceholder(key, offset, view_size)

    obj = Unpickler(f, storage, origin=origin, legacy=True).load()
    keys = header()
    data = {}
    for key in keys:
        storage_type = storages[key]
        (numel,) = struct.unpack('<q', f.read(8))
        nbytes = numel * storage_type.dtype.itemsize
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise UserError(f'{origin}: truncated (storage {key} has {len(raw)} of {nbytes} bytes)')
        data[key] = np.frombuffer(raw, dtype=storage_type.dtype.newbyteorder('<')).astype(storage_type.dtype)
    return _resolve_placeholders(obj, data)


class _StoragePlaceholder:
    """A legacy storage whose bytes come after the pickle: resolved once they are read."""

    def __init__(self, key, offset=0, size=None):
        self.key, self.offset, self.size = key, offset, size

    def resolve(self, data):
        array = data[self.key]
        return array[self.offset:] if self.size is None else array[self.offset:self.offset + self.size]


class _PendingTensor:
    def __init__(self, args):
        self.args = args


def _resolve_placeholders(obj, data):
    """Tensors of a legacy file were rebuilt before their storages were read: rebuild them now."""
    if isinstance(obj, _PendingTensor):
        storage, *rest = obj.args
        return _tensor(storage.resolve(data), *rest)
    if isinstance(obj, _StoragePlaceholder):
        return obj.resolve(data)
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _resolve_placeholders(v, data)) for k, v in obj.items())
    if isinstance(obj, dict):
        resolved = type(obj).__new__(type(obj)) if type(obj) is not dict else {}
        resolved.update({k: _resolve_placeholders(v, data) for k, v in obj.items()})
        return resolved
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve_placeholders(v, data) for v in obj)
    if isinstance(obj, TorchModuleState):
        obj.__dict__['_state'] = _resolve_placeholders(obj.state, data)
        return obj
    return obj


def _deferring_tensor(storage, *rest):
    """_rebuild_tensor_v2 in a legacy file: its storage placeholder gets its bytes only after the pickle."""
    if isinstance(storage, _StoragePlaceholder):
        return _PendingTensor((storage,) + rest)
    return _tensor(storage, *rest)


def load_file(f, origin='torch file'):
    """The object saved by `torch.save` in file object `f` (zip or legacy layout), tensors as NumPy arrays."""
    start = f.tell()
    if zipfile.is_zipfile(f):
        f.seek(start)
        with zipfile.ZipFile(f) as archive:
            return _load_zip(archive, origin)
    f.seek(start)
    return _load_legacy(f, origin)


def load_bytes(data, origin='torch file'):
    """`load_file` of an in-memory torch.save result (what `torch.storage._load_from_bytes` receives)."""
    return load_file(io.BytesIO(data), origin=origin)


def load(path):
    """The object `torch.save` wrote to `path`, with every tensor as a NumPy array (no torch needed).

    A missing path or a file of another kind is a UserError naming the path.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f'torch file {path} does not exist')
    with open(path, 'rb') as f:
        return load_file(f, origin=path)


def load_pickle(path, extra_globals, origin=None):
    """A plain pickle (not torch.save) that holds torch tensors, e.g. EDM's network pickles, with the restricted
    unpickler plus `extra_globals` {(module, name): callable}. Tensors come back as NumPy arrays."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f'pickle {path} does not exist')
    with open(path, 'rb') as f:
        return Unpickler(f, extra_globals=extra_globals, origin=origin or path).load()


def state_dict(obj, origin='torch file'):
    """The flat {name: array} of a loaded state dict (or a dict holding one under 'state_dict'/'model'/'ema')."""
    if isinstance(obj, dict):
        if all(isinstance(v, np.ndarray) for v in obj.values()):
            return dict(obj)
        for key in ('state_dict', 'ema', 'model', 'net'):
            if isinstance(obj.get(key), dict):
                return state_dict(obj[key], origin)
    raise UserError(f'{origin}: not a state dict of tensors')

