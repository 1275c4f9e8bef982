"""guided-diffusion's networks (Dhariwal & Nichol 2021, github.com/openai/guided-diffusion) as jaxdiff ADM networks,
without torch.

    network = adm.load('64x64_diffusion.pt')              # preset from the file name, or preset= / fields=
    network.kind             # 'unet' (UNetModel) or 'classifier' (EncoderUNetModel)
    network.model_fields     # config.model: {'name': 'adm', 'model_channels': 192, ..., 'learn_sigma': True}
    network.data_shape       # config.data.shape, (64, 64, 3)
    network.variables        # {'params': ...} of models.adm.ADMUNet / ADMEncoder
    network.info             # source, preset, noise_schedule, diffusion_steps
    state_dict = adm.state_dict_from_variables(network.variables)   # back to the authors' names and layouts

Files: a `torch.save`d state dict (.pt / .pth; read by `torch_file`, so torch is not needed) or an .npz with the
authors' names. The authors save the plain `model.state_dict()` of a UNetModel / EncoderUNetModel; the
architecture is not stored in it (head counts, attention order, dropout and the noise schedule are invisible in
shapes), so it comes from a preset (PRESETS: the released checkpoints with the flags of guided-diffusion's README,
and the discriminator guidance authors' 32x32 classifier) or from `fields` (jaxdiff fields; `unet_fields` and
`classifier_fields` translate guided-diffusion's command-line flags, as its script_util does).

Mapping: the Flax module names of models/adm.py are the authors' names with '.' before an index written '_'
(`input_blocks.4.0.in_layers.2.weight` <-> params['input_blocks_4_0']['in_layers_2']['kernel']). Layouts: conv
weights OIHW <-> HWIO; Linear weights [out, in] <-> [in, out]; the 1-D convolutions of attention (qkv, proj_out,
qkv_proj, c_proj) [out, in, 1] <-> [in, out]; GroupNorm `weight` <-> 'scale'; nn.Embedding `weight` <-> 'embedding'
(same layout); AttentionPool2d's `positional_embedding` [C, T + 1] <-> [T + 1, C]. Every key of the authors' state
dict maps to exactly one jaxdiff variable of the same size and back; anything else is a UserError naming the key.
"""
import dataclasses
import os
import re
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxdiff.convert import torch_file
from jaxdiff.convert.edm import variable_shapes
from jaxdiff.core.errors import UserError
from jaxdiff.models.adm import ADMEncoder, ADMUNet

KINDS = {'unet': ADMUNet, 'classifier': ADMEncoder}
MODEL_NAMES = {'unet': 'adm', 'classifier': 'adm_classifier'}   # config.model.name of each kind
CONV1D_MODULES = ('qkv', 'proj_out', 'qkv_proj', 'c_proj')       # torch Conv1d(kernel 1) in the authors' attention
NUM_CLASSES = 1000                                                # ImageNet (script_util.NUM_CLASSES)


# ---------------------------------------------------------------------------------------------- flags -> fields

def default_channel_mult(image_size):
    """channel_mult by image size: guided-diffusion's script_util (512 .. 64), improved-diffusion's 32 for UNets is
    (1, 2, 2, 2); the discriminator guidance authors' classifier adds 32: (1, 2, 4), 16: (1, 2), 8: (1,) -- see
    `classifier_fields`."""
    table = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4),
             32: (1, 2, 2, 2)}
    if image_size not in table:
        raise UserError(f'ADM: no default channel_mult for image_size={image_size}; give channel_mult '
                        f'(defaults exist for {", ".join(map(str, sorted(table)))})')
    return table[image_size]


def _rates(image_size, attention_resolutions):
    """Attention resolutions in pixels ('32,16,8' or a sequence) -> the downsample rates image_size // res."""
    if isinstance(attention_resolutions, str):
        attention_resolutions = [int(r) for r in attention_resolutions.split(',') if r.strip()]
    return tuple(image_size // int(r) for r in attention_resolutions)


def _mult(channel_mult, image_size, default=default_channel_mult):
    if channel_mult in ('', None):
        return default(image_size)
    if isinstance(channel_mult, str):
        channel_mult = channel_mult.split(',')
    return tuple(float(m) if float(m) != int(float(m)) else int(float(m)) for m in channel_mult)


def unet_fields(image_size=64, num_channels=128, num_res_blocks=2, channel_mult='', learn_sigma=False,
                class_cond=False, attention_resolutions='16', num_heads=1, num_head_channels=-1,
                num_heads_upsample=-1, use_scale_shift_norm=False, dropout=0.0, resblock_updown=False,
                use_new_attention_order=False, in_channels=3, num_classes=NUM_CLASSES):
    """ADMUNet fields of guided-diffusion's `create_model(...)` flags (same names and defaults;
    attention_resolutions in pixels, as its flags give them)."""
    return dict(img_resolution=int(image_size), in_channels=int(in_channels), out_channels=int(in_channels),
                learn_sigma=bool(learn_sigma), model_channels=int(num_channels),
                num_res_blocks=int(num_res_blocks), attention_resolutions=_rates(image_size, attention_resolutions),
                dropout=float(dropout), channel_mult=_mult(channel_mult, image_size), conv_resample=True,
                label_dim=int(num_classes) if class_cond else 0, num_heads=int(num_heads),
                num_head_channels=int(num_head_channels), num_heads_upsample=int(num_heads_upsample),
                use_scale_shift_norm=bool(use_scale_shift_norm), resblock_updown=bool(resblock_updown),
                use_new_attention_order=bool(use_new_attention_order))


def _classifier_mult(image_size):
    table = {32: (1, 2, 4), 16: (1, 2), 8: (1,)}   # the discriminator guidance authors' create_classifier
    return table[image_size] if image_size in table else default_channel_mult(image_size)


def classifier_fields(image_size=64, classifier_width=128, classifier_depth=2,
                      classifier_attention_resolutions='32,16,8', classifier_use_scale_shift_norm=True,
                      classifier_resblock_updown=True, classifier_pool='attention', out_channels=NUM_CLASSES,
                      in_channels=3, num_classes=0):
    """ADMEncoder fields of guided-diffusion's `create_classifier(...)` flags (same names and defaults; 64 channels
    per attention head, as create_classifier fixes). num_classes > 0: the discriminator guidance authors'
    class-conditional variant (`condition=True`)."""
    return dict(img_resolution=int(image_size), in_channels=int(in_channels), out_channels=int(out_channels),
                model_channels=int(classifier_width), num_res_blocks=int(classifier_depth),
                attention_resolutions=_rates(image_size, classifier_attention_resolutions), dropout=0.0,
                channel_mult=_classifier_mult(image_size), conv_resample=True, label_dim=int(num_classes),
                num_heads=1, num_head_channels=64, use_scale_shift_norm=bool(classifier_use_scale_shift_norm),
                resblock_updown=bool(classifier_resblock_updown), use_new_attention_order=False,
                pool=classifier_pool)


def _unet(noise_schedule, **flags):
    return dict(kind='unet', noise_schedule=noise_schedule, fields=unet_fields(**flags))


def _classifier(**flags):
    return dict(kind='classifier', noise_schedule=None, fields=classifier_fields(**flags))


_ADM_FLAGS = dict(class_cond=True, learn_sigma=True, num_res_blocks=2, resblock_updown=True,
                  use_scale_shift_norm=True, attention_resolutions='32,16,8')
# The released checkpoints (guided-diffusion README, "Sampling from pre-trained models": MODEL_FLAGS of each; the
# classifiers' flags are classifier_defaults plus the README's; DG's 32x32 classifier: DG's classifier_lib.py).
PRESETS = {
    '64x64_diffusion': _unet('cosine', **{**_ADM_FLAGS, 'image_size': 64, 'num_channels': 192, 'num_res_blocks': 3,
                                          'num_head_channels': 64, 'use_new_attention_order': True, 'dropout': 0.1}),
    '128x128_diffusion': _unet('linear', **{**_ADM_FLAGS, 'image_size': 128, 'num_channels': 256, 'num_heads': 4}),
    '256x256_diffusion': _unet('linear', **{**_ADM_FLAGS, 'image_size': 256, 'num_channels': 256,
                                            'num_head_channels': 64}),
    '256x256_diffusion_uncond': _unet('linear', **{**_ADM_FLAGS, 'image_size': 256, 'num_channels': 256,
                                                   'num_head_channels': 64, 'class_cond': False}),
    '512x512_diffusion': _unet('linear', **{**_ADM_FLAGS, 'image_size': 512, 'num_channels': 256,
                                            'num_head_channels': 64}),
    '64x64_classifier': _classifier(image_size=64, classifier_depth=4),
    '128x128_classifier': _classifier(image_size=128),
    '256x256_classifier': _classifier(image_size=256),
    '512x512_classifier': _classifier(image_size=512),
    '32x32_classifier': _classifier(image_size=32, classifier_depth=4),
}


# ---------------------------------------------------------------------------------------------- models and shapes

def build_model(kind, fields):
    """The jaxdiff ADM network of `kind` ('unet' / 'classifier') with `fields` (validated; a bad field is a
    UserError)."""
    if kind not in KINDS:
        raise UserError(f'ADM kind {kind!r}; valid: {", ".join(KINDS)}')
    cls = KINDS[kind]
    valid = [f.name for f in dataclasses.fields(cls) if f.name not in ('parent', 'name')]
    unknown = sorted(set(fields) - set(valid))
    if unknown:
        raise UserError(f'ADM {kind}: unknown field(s) {", ".join(unknown)}; valid: {", ".join(valid)}')
    model = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    try:
        model.validate()
    except ValueError as error:
        raise UserError(f'ADM {kind}: {error}') from None
    return model


def torch_name(path):
    """jaxdiff param path -> the authors' state dict key ('_<index>' in a module name -> '.<index>')."""
    *modules, leaf = path
    parts = [re.sub(r'_(\d+)', r'.\1', module) for module in modules]
    return '.'.join(parts + [{'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight'}.get(leaf, leaf)])


def to_torch_array(path, value):
    """jaxdiff layout -> the authors' layout of the variable at `path` (see the module docstring)."""
    value = np.asarray(value, np.float32)
    leaf, module = path[-1], (path[-2] if len(path) > 1 else '')
    if leaf == 'kernel' and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if leaf == 'kernel' and value.ndim == 2:
        return value.T[..., None] if module in CONV1D_MODULES else value.T
    if leaf == 'positional_embedding':
        return value.T
    return value


def to_jaxdiff_array(path, value):
    """The inverse of `to_torch_array`."""
    value = np.asarray(value, np.float32)
    leaf, module = path[-1], (path[-2] if len(path) > 1 else '')
    if leaf == 'kernel' and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if leaf == 'kernel' and module in CONV1D_MODULES:
        return value[..., 0].T
    if leaf == 'kernel' or leaf == 'positional_embedding':
        return value.T
    return value


def _torch_shape(path, shape):
    return to_torch_array(path, np.zeros(shape, np.float32)).shape


def torch_shapes(model):
    """{the authors' key: shape} of the state dict this model corresponds to (from shapes alone)."""
    flat = traverse_util.flatten_dict(variable_shapes(model)['params'])
    return {torch_name(path): _torch_shape(path, leaf.shape) for path, leaf in flat.items()}


def _kind_of(model):
    return next(kind for kind, cls in KINDS.items() if isinstance(model, cls))


def variables_from_state_dict(state_dict, model, origin='ADM state dict'):
    """{'params': ...} of `model` from the authors' state dict: the keys must be exactly the model's (no key left
    over on either side) and every shape must match; otherwise a one-line UserError naming the key."""
    kind = _kind_of(model)
    flat = traverse_util.flatten_dict(variable_shapes(model)['params'])
    expected = {torch_name(path): (path, _torch_shape(path, leaf.shape)) for path, leaf in flat.items()}
    names = list(state_dict)
    if not set(names) & set(expected):
        raise UserError(f'{origin}: not a guided-diffusion {kind} state dict (no key matches; it has '
                        f'{len(names)} keys like {", ".join(sorted(map(str, names))[:3]) or "none"})')
    missing = sorted(set(expected) - set(names))
    extra = sorted(set(names) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f'{len(missing)} key(s) of the ADM {kind} missing, e.g. {missing[0]}')
        if extra:
            parts.append(f'{len(extra)} key(s) the ADM {kind} does not have, e.g. {extra[0]}')
        raise UserError(f'{origin}: {" and ".join(parts)} (the architecture fields do not match this file)')
    params = {}
    for name in names:
        path, want = expected[name]
        value = state_dict[name]
        got = tuple(np.shape(value))
        if got != want:
            raise UserError(f'{origin}: {name} has shape {got} in the file, the ADM {kind} expects {want}')
        if not np.issubdtype(np.asarray(value).dtype, np.floating) and \
                np.asarray(value).dtype.name != 'bfloat16':
            raise UserError(f'{origin}: {name} has dtype {np.asarray(value).dtype}, expected floating point weights')
        params[path] = to_jaxdiff_array(path, value)
    return {'params': traverse_util.unflatten_dict(params)}


def state_dict_from_variables(variables):
    """The authors' state dict {key: float32 NumPy array} of an ADM network's variables (the inverse of
    `variables_from_state_dict`)."""
    params = variables['params'] if 'params' in variables else variables
    return {torch_name(path): to_torch_array(path, value)
            for path, value in traverse_util.flatten_dict(params).items()}


# ---------------------------------------------------------------------------------------------- entry point

@dataclasses.dataclass
class Network:
    """A converted guided-diffusion network: what a jaxdiff config and checkpoint need."""
    kind: str                # 'unet' | 'classifier'
    model_fields: dict       # config.model, including 'name' ('adm' / 'adm_classifier')
    data_shape: tuple        # config.data.shape (R, R, C)
    variables: dict          # {'params': ...}
    info: dict = dataclasses.field(default_factory=dict)   # source, preset, noise_schedule, diffusion_steps


def read_state_dict(path):
    """{key: NumPy array} of a torch.save'd state dict (.pt / .pth / anything torch_file reads) or an .npz."""
    if path.endswith('.npz'):
        try:
            with np.load(path) as arrays:
                return {name: arrays[name] for name in arrays.files}
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            raise UserError(f'{path} is not a readable .npz of weights ({type(error).__name__}: {error})') from None
    obj = torch_file.load(path)
    return torch_file.state_dict(obj, origin=path)


def _preset_of(path, preset):
    if preset is not None:
        if preset not in PRESETS:
            raise UserError(f'ADM preset {preset!r}; valid: {", ".join(PRESETS)}')
        return preset
    stem = os.path.splitext(os.path.basename(path))[0]
    return stem if stem in PRESETS else None


def load(path, preset=None, fields=None, kind=None):
    """A Network from a guided-diffusion state dict file.

    preset: a PRESETS name (default: the file's name without extension when it is one, e.g. 64x64_diffusion.pt);
    fields: ADMUNet / ADMEncoder fields overriding the preset's (all of them, with `kind`, for a file that is no
    preset). The file must hold exactly the network's keys with the network's shapes.
    """
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise UserError(f'ADM network {path} does not exist (guided-diffusion\'s checkpoints: '
                        f'{", ".join(name + ".pt" for name in PRESETS)})')
    name = _preset_of(path, preset)
    if name is None and (fields is None or kind is None):
        raise UserError(f'{path}: say which ADM network it holds: preset= one of {", ".join(PRESETS)}, or kind= '
                        f'({" / ".join(KINDS)}) and fields= (see convert.adm.unet_fields / classifier_fields)')
    spec = PRESETS[name] if name else dict(kind=kind, noise_schedule=None, fields={})
    if kind is not None and kind != spec['kind']:
        raise UserError(f'{path}: preset {name!r} is a {spec["kind"]}, not kind={kind!r}')
    model_fields = {**spec['fields'], **(fields or {})}
    model = build_model(spec['kind'], model_fields)
    state_dict = read_state_dict(path)
    variables = variables_from_state_dict(state_dict, model, origin=path)
    config = {'name': MODEL_NAMES[spec['kind']]}
    config.update({k: v for k, v in model_fields.items() if k not in ('img_resolution', 'in_channels')})
    if spec['kind'] == 'unet':
        config.pop('out_channels', None)
    info = dict(source=path, preset=name, noise_schedule=spec['noise_schedule'], diffusion_steps=1000)
    return Network(kind=spec['kind'], model_fields=config,
                   data_shape=(model.img_resolution, model.img_resolution, model.in_channels),
                   variables=variables, info=info)
