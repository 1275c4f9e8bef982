"""Command-line config overrides, `--config.PATH=VALUE`: parsed here, in one place, for jaxdiff.main.

absl's config_flags applies an override by looking PATH up in the loaded config (`config_path.get_type`) and
parsing VALUE with the parser of that field's type; a PATH the config lacks fails inside flag parsing, as a
traceback. So `split` takes every override off the command line before absl parses it (absl then only loads the
file), and `apply` sets them on the loaded config, in command-line order:

  open sections  option dicts whose keys are the keyword arguments of a registry entry (OPEN_SECTIONS: the
                 sampler's, the schedule's, the guidance transform's): any KEY, `--config.SECTION.KEY=VALUE`, VALUE
                 read as a Python literal (else a string); the sampler, schedule or transform then says whether KEY
                 is one of its options. The section is created when the config has none.
  other fields   PATH must name a field of the config, else one line: `unknown config field sampling.num_steps;
                 valid fields of config.sampling: ...`; VALUE is then parsed by config_flags itself (a
                 `DEFINE_config_dict` over the loaded config), so ints, floats, bools (`--config.X`, `--noconfig.X`),
                 tuples and placeholders convert exactly as absl converts them.
Every problem is a `UserError` naming the flag.
"""
import ast
from typing import NamedTuple

from absl import flags
from ml_collections import config_dict, config_flags

from jaxdiff.core.errors import UserError

OPEN_SECTIONS = ('sampling.sampler_options', 'sampling.schedule_options', 'sampling.guidance',
                 'amed.schedule_options')
_PREFIXES = ('--config.', '-config.', '--noconfig.', '-noconfig.')


class Override(NamedTuple):
    """One `--config.PATH[=VALUE]`: the field's dotted path and the argument(s) as given."""
    path: str
    args: tuple


def split(argv):
    """(argv without the overrides, [Override, ...] in order). `--config.PATH VALUE` (no '=') takes the next
    argument as its value unless that one starts with '-' (then it is a boolean `--config.PATH`)."""
    kept, found = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        prefix = next((p for p in _PREFIXES if arg.startswith(p)), None)
        if prefix is None or i == 0:
            kept.append(arg)
            i += 1
            continue
        path = arg[len(prefix):].split('=', 1)[0]
        args = (arg,)
        if '=' not in arg and 'no' not in prefix and i + 1 < len(argv) and not argv[i + 1].startswith('-'):
            args = (arg, argv[i + 1])
        found.append(Override(path, args))
        i += len(args)
    return kept, found


def _value(override):
    """VALUE of an override as config_flags' literal parser reads it ('true' / 'false' as booleans)."""
    arg = override.args[0]
    if len(override.args) == 2:
        text = override.args[1]
    elif '=' in arg:
        text = arg.split('=', 1)[1]
    else:
        return not arg.lstrip('-').startswith('no')      # a bare --config.PATH / --noconfig.PATH
    text = text.capitalize() if text in ('true', 'false') else text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _is_section(value):
    return isinstance(value, (config_dict.ConfigDict, dict))


def _section(config, parts, whole):
    """The section config.parts[0]...; UserError naming the first missing part and the valid ones."""
    section = config
    for depth, name in enumerate(parts):
        where = '.'.join(['config', *parts[:depth]])
        if not _is_section(section):
            raise UserError(f'unknown config field {whole}: {where} is a value, not a section')
        if name not in section:
            raise UserError(f'unknown config field {whole}; valid fields of {where}: '
                            f'{", ".join(sorted(section.keys()))}')
        section = section[name]
    return section


def _open_section(path):
    """(section path, key) when `path` is a key of an open section, else None."""
    for section in OPEN_SECTIONS:
        if path.startswith(section + '.'):
            key = path[len(section) + 1:]
            if '.' in key:
                raise UserError(f'--config.{path}: the keys of config.{section} are single names')
            return section, key
    return None


def _set_open(config, section_path, key, value):
    *parents, name = section_path.split('.')
    parent = _section(config, parents, section_path)
    options = dict(parent.get(name) or {})
    options[key] = value
    with config.unlocked():
        parent[name] = options


def _set_field(config, override):
    """One override of an existing field, parsed and set by config_flags (absl's own types and parsers)."""
    _section(config, override.path.split('.'), override.path)
    argv = ['jaxdiff', *override.args]
    flag_values = flags.FlagValues()
    try:
        config_flags.DEFINE_config_dict('config', config, flag_values=flag_values, sys_argv=argv,
                                        lock_config=False)
        flag_values(argv)
    except (flags.Error, TypeError, ValueError, KeyError, AttributeError) as e:
        message = ' '.join(str(e).split())
        raise UserError(message if f'config.{override.path}' in message else f'--config.{override.path}: {message}') \
            from None


def apply(config, overrides):
    """Sets every `Override` on `config` (a ConfigDict) in order; returns config."""
    for override in overrides:
        opened = _open_section(override.path)
        if opened is not None:
            _set_open(config, *opened, _value(override))
        else:
            _set_field(config, override)
    return config
