"""Checks a config section before anything is built or compiled: each bad field is one UserError line naming it.

Every section is checked the same way: a table {field: Rule} (known fields, kinds, ranges, choices) read by
`section`, which also fills in the fields a config leaves out from a table of defaults. This module holds the
tables of config.training, config.sampling and config.augment; the drivers that read config.discriminator,
config.amed and config.evaluation hold theirs beside their defaults. Sections the library reads elsewhere
(config.model by `models.build`, config.loss by `losses.build`, config.data by `data.build`, samplers and
schedules by their registries) are validated there.

    TABLE = {'batch_size': integer(1), 'lr': number(0, open_lower=True), 'metric': choice('fid', 'digits'),
             'kid': FLAG, 'path': ANY}
    values = section(config, 'evaluation', TABLE, defaults=dict(batch_size=64, ...))
"""
import numbers
from typing import Any, NamedTuple

from jaxdiff.core.errors import UserError


class Rule(NamedTuple):
    """What one field may hold. kind: 'int' | 'float' | 'bool' | 'choice' | 'any'; lower / upper: bounds of a
    number (None: none), open_lower / open_upper: whether the bound itself is excluded; optional: None is allowed;
    choices: the valid values of a 'choice'."""
    kind: str
    lower: Any = None
    upper: Any = None
    open_lower: bool = False
    open_upper: bool = False
    optional: bool = False
    choices: tuple = ()

    def check(self, name, value):
        """Raises a one-line UserError naming `name`=value and what it must be."""
        if value is None and (self.optional or self.kind == 'any'):
            return
        if self.kind == 'choice':
            if value not in self.choices:
                raise UserError(f'{name}={value!r}; valid choices: {", ".join(str(c) for c in self.choices)}')
        elif self.kind == 'bool':
            if not isinstance(value, bool):
                raise UserError(f'{name}={value!r} must be True or False' + (' or None' if self.optional else ''))
        elif self.kind in ('int', 'float'):
            none = 'None or ' if self.optional else ''
            if self.kind == 'int':
                if isinstance(value, bool) or not isinstance(value, numbers.Real) or int(value) != value or \
                        not self._in_range(value):
                    raise UserError(f'{name}={value!r} must be {none}an integer {self._range()}'.rstrip())
            elif isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise UserError(f'{name}={value!r} must be {none}a number')
            elif not self._in_range(value):
                raise UserError(f'{name}={value!r} must be {none}{self._range()}'.rstrip())

    def _in_range(self, value):
        if self.lower is not None and (value < self.lower or (self.open_lower and value == self.lower)):
            return False
        return self.upper is None or (value < self.upper or (not self.open_upper and value == self.upper))

    def _range(self):
        if self.upper is None:
            return '' if self.lower is None else f'{">" if self.open_lower else ">="} {self.lower}'
        return f'in {"(" if self.open_lower else "["}{self.lower}, {self.upper}{")" if self.open_upper else "]"}'


def integer(lower=None, *, optional=False):
    """An integer >= lower (an integral float such as 64.0 passes; True/False do not)."""
    return Rule('int', lower, optional=optional)


def number(lower=None, upper=None, *, open_lower=False, open_upper=False, optional=False):
    """A real number within the bounds."""
    return Rule('float', lower, upper, open_lower, open_upper, optional)


def choice(*values):
    """One of `values` (None may be one of them)."""
    return Rule('choice', choices=tuple(values))


FLAG = Rule('bool')
ANY = Rule('any')


def section(config, name, table, defaults=None, *, missing=None):
    """config.<name> as a dict, every field checked against `table` (an unknown field names the valid ones), the
    fields it leaves out taken from `defaults`. A missing section: {} of defaults when `defaults` is given and
    `missing` is None, else the UserError `missing` (or 'config.<name> is missing')."""
    if name not in config or config[name] is None:
        if defaults is None or missing is not None:
            raise UserError(missing or f'config.{name} is missing')
        given = {}
    else:
        given = dict(config[name])
    unknown = sorted(set(given) - set(table))
    if unknown:
        raise UserError(f'config.{name} has no field {unknown[0]}; valid fields: {", ".join(sorted(table))}')
    values = {**dict(defaults or {}), **given}
    for field, rule in table.items():
        if field in values:
            rule.check(f'config.{name}.{field}', values[field])
    return values


# ---------------------------------------------------------------- the training run's sections

TRAINING = {
    'batch_size': integer(1), 'total_images': integer(1), 'lr': number(0.0, open_lower=True),
    'lr_rampup_images': number(0.0), 'ema_halflife_images': number(0.0, open_lower=True),
    'ema_rampup_ratio': number(0.0, open_lower=True, optional=True), 'seed': integer(0),
    'log_every_steps': integer(1), 'checkpoint_every_steps': integer(1), 'keep_checkpoints': integer(1),
    'sample_every_steps': integer(0), 'precision': choice('fp32', 'tf32', 'bf16'), 'parallelism': choice('jit', 'pmap'),
    'label_dropout': number(0.0, 1.0, open_upper=True),
}
SAMPLING = {'num_samples': integer(1), 'batch_size': integer(1), 'seed': integer(0),
            **{field: ANY for field in ('sampler', 'sampler_options', 'schedule', 'schedule_options',
                                        'predictor_workdir', 'class_label', 'guidance')}}


def check_training(config):
    section(config, 'training', TRAINING)


def check_sampling(config):
    section(config, 'sampling', SAMPLING)


def check_augment(config):
    """config.augment: the keyword arguments of `jaxdiff.core.augment.augment` (p in [0, 1], the rest >= 0)."""
    if 'augment' not in config:
        return
    import inspect

    from jaxdiff.core import augment
    table = {p.name: number(0.0) for p in inspect.signature(augment.augment).parameters.values()
             if p.kind == p.KEYWORD_ONLY}
    table['p'] = number(0.0, 1.0)
    section(config, 'augment', table)


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
