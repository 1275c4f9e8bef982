"""Command line: `python -m jaxdiff.main --config=configs/NAME.py --workdir=DIR [--mode=MODE] [--config.FIELD=VALUE ...]`.

MODES maps each mode to `run(config, workdir)` in jaxdiff/modes/, imported only when chosen; no logic here beyond
turning command-line problems into one `error:` line.

Option dicts (config.sampling.sampler_options, schedule_options) take any key from the command line, also one the
config file does not list (`--config.sampling.sampler_options.eta=1.0`): the chosen sampler or schedule says
whether it is valid.
"""
import ast
import importlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxdiff.drivers import config_files
from jaxdiff.core.errors import UserError

MODES = {
    'train': 'jaxdiff.modes.train:run',
    'sample': 'jaxdiff.modes.sample:run',
    'summary': 'jaxdiff.modes.summary:run',
    'bench': 'jaxdiff.modes.bench:run',
    'train_amed': 'jaxdiff.modes.train_amed:run',
    'train_discriminator': 'jaxdiff.modes.train_discriminator:run',
    'evaluate': 'jaxdiff.modes.evaluate:run',
    'import_edm': 'jaxdiff.modes.import_edm:run',
}
OPEN_SECTIONS = ('sampling.sampler_options', 'sampling.schedule_options')

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'ml-collections config file (configs/NAME.py).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and samples.')
flags.DEFINE_enum('mode', 'train', list(MODES), 'What to run.')

_open_overrides = {}   # 'sampling.sampler_options.eta' -> value, taken off argv before absl parses it


def _parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def take_open_overrides(argv):
    """argv without --config.<open section>.KEY=VALUE arguments (returned separately as {dotted: value})."""
    kept, taken = [], {}
    for arg in argv:
        name, _, value = arg.partition('=')
        field = name[len('--config.'):] if name.startswith('--config.') else ''
        section = field.rpartition('.')[0]
        if section in OPEN_SECTIONS and _:
            taken[field] = _parse_value(value)
        else:
            kept.append(arg)
    return kept, taken


def apply_open_overrides(config, overrides):
    for field, value in overrides.items():
        section_name, _, key = field.rpartition('.')
        group, sub = section_name.split('.')
        if group not in config:
            raise UserError(f'--config.{field}: the config has no section {group}')
        options = dict(config[group].get(sub) or {})
        options[key] = value
        with config.unlocked():
            config[group][sub] = options


def check_config_path(argv):
    """One line instead of a traceback for --config naming a file that does not exist."""
    for i, arg in enumerate(argv):
        path = arg.split('=', 1)[1] if arg.startswith('--config=') else (
            argv[i + 1] if arg == '--config' and i + 1 < len(argv) else None)
        if path is None:
            continue
        if not os.path.isfile(path.split(':')[0]):
            print(f'error: config file not found: {path} (configs are files like configs/quickstart.py)',
                  file=sys.stderr)
            sys.exit(2)
        config_files.make_importable(path.split(':')[0])


def main(argv):
    del argv
    if FLAGS.config is None:
        raise app.UsageError('--config is required, e.g. --config=configs/quickstart.py')
    if not FLAGS['verbosity'].present:  # keep library INFO logs (orbax) off the console unless asked for
        logging.set_verbosity(logging.ERROR)
    module_name, function_name = MODES[FLAGS.mode].split(':')
    try:
        apply_open_overrides(FLAGS.config, _open_overrides)
        run = getattr(importlib.import_module(module_name), function_name)
        run(FLAGS.config, FLAGS.workdir)
    except (UserError, ValueError, FileNotFoundError) as e:
        logging.flush()
        print(f'error: {e}', file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)   # no interpreter teardown: background threads (orbax, prefetch) cannot print tracebacks


def entry():
    argv, overrides = take_open_overrides(sys.argv)
    _open_overrides.update(overrides)
    sys.argv[:] = argv   # config_flags reads its overrides from sys.argv
    check_config_path(argv)
    app.run(main, argv=argv)


if __name__ == '__main__':
    entry()
