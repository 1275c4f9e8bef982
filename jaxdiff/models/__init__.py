"""Denoiser networks (Flax Linen, NHWC) and their registry: `build(name, **fields)`.

Every network maps `(x, noise_labels, class_labels=None, augment_labels=None, train=False)` to the raw output F of
EDM's D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (Karras et al. 2022, eq. 7); preconditioning lives in
`jaxdiff.core.precond`. Intermediate features are sown into the 'intermediates' collection (the denoiser networks sow
'bottleneck'; read them with `apply(..., mutable=['intermediates'])`). Non-trainable state lives in 'buffers' (NCSN++'s
Fourier frequencies): `init(model, data_shape, key)` returns every collection, `params` is its 'params' entry.

Names:
  'ddpmpp'  SongUNet, DDPM++ preset of EDM's CIFAR-10 config (Karras et al. 2022, App. F.2 / Table 7; Song et al.
            2021): 55,733,891 trainable parameters at 32x32x3 with augment_dim=9.
  'ncsnpp'  SongUNet, NCSN++ preset (Fourier embedding, residual encoder, [1,3,3,1] filter): 56,397,827 parameters.
  'mlp'     small residual MLP for 2-D / flattened data (`jaxdiff.models.mlp.MLP`).
Fields given to `build` override the preset; an unknown name or field raises ValueError listing the valid ones.

A small SongUNet for 16x16x1 digits, small enough to train on a CPU (715,201 parameters):

    build('ddpmpp', img_resolution=16, in_channels=1, out_channels=1, model_channels=32, channel_mult=(1, 2),
          num_blocks=1, attn_resolutions=(), dropout=0.0, augment_dim=0)

In a config: `config.model = dict(name='ddpmpp', model_channels=32, channel_mult=(1, 2), num_blocks=1,
attn_resolutions=(), dropout=0.0, augment_dim=0)` with `config.data.shape = (16, 16, 1)`; `from_config` fills
img_resolution / in_channels / out_channels from the data shape.

The registry names each network as `module:class` in this package, imported when built, so this package imports
none of its modules and they import each other directly (`from jaxdiff.models import layers`).
"""
import dataclasses
import importlib

import jax
import jax.numpy as jnp

_CIFAR10 = dict(img_resolution=32, in_channels=3, out_channels=3, label_dim=0, augment_dim=9, model_channels=128,
                channel_mult=(2, 2, 2), channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,), dropout=0.13)

# name -> ('module:class' of this package, preset fields). Presets are EDM's `--arch=ddpmpp` / `--arch=ncsnpp`
# CIFAR-10 settings.
_MODELS = {
    'ddpmpp': ('songunet:SongUNet', dict(_CIFAR10, embedding_type='positional', channel_mult_noise=1,
                                         encoder_type='standard', decoder_type='standard', resample_filter=(1, 1))),
    'ncsnpp': ('songunet:SongUNet', dict(_CIFAR10, embedding_type='fourier', channel_mult_noise=2,
                                         encoder_type='residual', decoder_type='standard',
                                         resample_filter=(1, 3, 3, 1))),
    'mlp': ('mlp:MLP', {}),
    'tanh_mlp': ('encoder:TanhMLP', {}),                # Fast-ODE's 2-D flow network (models/encoder.py)
    'fastode_encoder': ('encoder:UNetEncoder', {}),     # Fast-ODE's q(z | x), a small SongUNet (CIFAR-10 preset)
    'fastode_mlp_encoder': ('encoder:MLPEncoder', {}),  # Fast-ODE's q(z | x) for 2-D data
}


def names():
    return sorted(_MODELS)


def fields(name):
    """The keyword fields `build(name, ...)` accepts (the module's dataclass fields)."""
    cls, _ = _lookup(name)
    return [f.name for f in dataclasses.fields(cls) if f.name not in ('parent', 'name')]


def _lookup(name):
    """(module class, preset fields) of network `name`; the class's module is imported here."""
    if name not in _MODELS:
        raise ValueError(f'unknown model {name!r}; valid models: {", ".join(names())}')
    location, preset = _MODELS[name]
    module_name, class_name = location.split(':')
    return getattr(importlib.import_module(f'{__name__}.{module_name}'), class_name), preset


def _normalize(value):
    """Config values arrive as lists or strings; module fields want tuples (hashable) and dtypes."""
    return tuple(value) if isinstance(value, list) else value


def build(name, **overrides):
    """Builds network `name` from its preset with `overrides` (module fields) applied; validates the fields."""
    cls, preset = _lookup(name)
    valid = fields(name)
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f'model {name!r} has no field(s) {", ".join(unknown)}; valid fields: {", ".join(valid)}')
    kwargs = {k: _normalize(v) for k, v in {**preset, **overrides}.items()}
    if 'dtype' in kwargs:
        try:
            kwargs['dtype'] = jnp.dtype(kwargs['dtype'])
        except TypeError as e:
            raise ValueError(f'model.dtype={kwargs["dtype"]!r} is not a dtype') from e
    model = cls(**kwargs)
    model.validate()
    return model


def from_config(config, section='model'):
    """`build(config.model.name, **rest)` with the SongUNet shape fields taken from `config.data.shape` (H, W, C).
    section: another config section naming a network the same way (a loss's extra network, e.g. 'encoder').

    A shape field set in config.model must agree with the data shape; a mismatch is a ValueError naming both.
    """
    if section not in config:
        raise ValueError(f'config.{section} is missing: the loss needs a network named {section!r} '
                         f'(config.{section} = dict(name=..., ...); models: {", ".join(names())})')
    model_fields = dict(config[section])
    name = model_fields.pop('name')
    data_shape = tuple(config.data.shape)
    if 'img_resolution' in fields(name):          # SongUNet and networks built on it (the Fast-ODE encoder)
        if len(data_shape) != 3 or data_shape[0] != data_shape[1]:
            raise ValueError(f'model {name!r} needs square images, data.shape=(H, H, C); got {data_shape}')
        implied = dict(img_resolution=data_shape[0], in_channels=data_shape[2], out_channels=data_shape[2])
        implied = {field: value for field, value in implied.items() if field in fields(name)}
        for field, value in implied.items():
            if field in model_fields and model_fields[field] != value:
                raise ValueError(f'model.{field}={model_fields[field]} disagrees with data.shape={data_shape}')
            model_fields[field] = value
    return build(name, **model_fields)


def init(model, data_shape, key):
    """All variable collections of `model` ('params', and e.g. 'buffers') for inputs of `data_shape`."""
    return model.init(key, jnp.zeros((1, *data_shape), jnp.float32), jnp.zeros((1,), jnp.float32))


def param_shapes(model, data_shape):
    """Parameter tree of `model` as ShapeDtypeStructs (jax.eval_shape: nothing is allocated or compiled)."""
    x = jax.ShapeDtypeStruct((1, *data_shape), jnp.float32)
    noise_labels = jax.ShapeDtypeStruct((1,), jnp.float32)
    variables = jax.eval_shape(lambda x, c: model.init(jax.random.key(0), x, c), x, noise_labels)
    return variables['params']


def count_params(params):
    """Total number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
    return int(sum(leaf.size for leaf in jax.tree_util.tree_leaves(params)))
