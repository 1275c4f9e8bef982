"""Checks a run's config before anything is built or compiled: each bad field is one UserError line naming it.

Sections and fields that the library reads elsewhere (config.model by `models.build`, config.loss by `losses.build`,
config.data by `data.build`, samplers and schedules by their registries) are validated there; this module checks
the numbers of config.training, config.sampling and config.augment: known fields, types and ranges.
"""
import numbers

from jaxdiff.core.errors import UserError

# field -> (kind, lower bound, inclusive). kind: 'int' | 'float' | 'optional_float'
TRAINING = {
    'batch_size': ('int', 1, True), 'total_images': ('int', 1, True), 'lr': ('float', 0.0, False),
    'lr_rampup_images': ('float', 0.0, True), 'ema_halflife_images': ('float', 0.0, False),
    'ema_rampup_ratio': ('optional_float', 0.0, False), 'seed': ('int', 0, True),
    'log_every_steps': ('int', 1, True), 'checkpoint_every_steps': ('int', 1, True),
    'keep_checkpoints': ('int', 1, True), 'sample_every_steps': ('int', 0, True),
}
TRAINING_CHOICES = {'precision': ('fp32', 'tf32', 'bf16'), 'parallelism': ('jit', 'pmap')}
SAMPLING = {'num_samples': ('int', 1, True), 'batch_size': ('int', 1, True), 'seed': ('int', 0, True)}
SAMPLING_OTHER = ('sampler', 'sampler_options', 'schedule', 'schedule_options', 'predictor_workdir', 'class_label',
                  'guidance')


def _check_number(section, field, value, kind, lower, inclusive):
    name = f'config.{section}.{field}'
    if kind == 'optional_float' and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UserError(f'{name}={value!r} must be a number')
    if kind == 'int' and int(value) != value:
        raise UserError(f'{name}={value!r} must be an integer')
    if value < lower or (value == lower and not inclusive):
        bound = f'>= {lower}' if inclusive else f'> {lower}'
        raise UserError(f'{name}={value!r} must be {bound}')


def _check_section(config, section, numeric, choices=(), other=()):
    if section not in config:
        raise UserError(f'config.{section} is missing')
    fields = dict(config[section])
    known = set(numeric) | set(choices) | set(other)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise UserError(f'config.{section} has no field {unknown[0]}; valid fields: {", ".join(sorted(known))}')
    for field, (kind, lower, inclusive) in numeric.items():
        if field in fields:
            _check_number(section, field, fields[field], kind, lower, inclusive)
    for field, valid in dict(choices).items():
        if field in fields and fields[field] not in valid:
            raise UserError(f'config.{section}.{field}={fields[field]!r}; valid choices: {", ".join(valid)}')


def check_training(config):
    _check_section(config, 'training', TRAINING, TRAINING_CHOICES)


def check_sampling(config):
    _check_section(config, 'sampling', SAMPLING, other=SAMPLING_OTHER)


def check_augment(config):
    """config.augment: the keyword arguments of `jaxdiff.core.augment.augment` (p in [0, 1], the rest >= 0)."""
    if 'augment' not in config:
        return
    import inspect

    from jaxdiff.core import augment
    valid = [p.name for p in inspect.signature(augment.augment).parameters.values() if p.kind == p.KEYWORD_ONLY]
    fields = dict(config.augment)
    unknown = sorted(set(fields) - set(valid))
    if unknown:
        raise UserError(f'config.augment has no field {unknown[0]}; valid fields: {", ".join(valid)}')
    for field, value in fields.items():
        _check_number('augment', field, value, 'float', 0.0, True)
    if fields.get('p', 0) > 1:
        raise UserError(f'config.augment.p={fields["p"]!r} must be a probability in [0, 1]')


def check_conditioning(config):
    """A class-conditional model trained with OT pairing must pair within classes (AOT's per-class pools)."""
    label_dim = int(dict(config.model).get('label_dim', 0) or 0)
    loss = dict(config.loss)
    if label_dim and loss.get('pairing') == 'aot' and not loss.get('per_class'):
        raise UserError(f'config.loss.per_class must be True for a class-conditional model (model.label_dim='
                        f'{label_dim}) with loss.pairing=\'aot\': otherwise noise is paired across classes')


def check(config):
    """Everything a training run reads from config.training, config.sampling and config.augment."""
    check_training(config)
    check_sampling(config)
    check_augment(config)
    check_conditioning(config)
