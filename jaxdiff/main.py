"""Command line: `python -m jaxdiff.main --config=configs/NAME.py --workdir=DIR [--mode=MODE] [--config.FIELD=VALUE ...]`.

MODES maps each mode to `run(config, workdir)` in jaxdiff/modes/, imported only when chosen; no logic here beyond
turning command-line problems into one `error:` line.

`--config.FIELD=VALUE` overrides are parsed by jaxdiff.drivers.overrides, not by absl: absl loads the file, then a
config that imports a network (an `edm_import` section) gets the sections of the network in its workdir
(jaxdiff.drivers.edm_import.resolve), then the overrides apply. A misspelled field is one line naming the valid
ones; option dicts (config.sampling.sampler_options, schedule_options, guidance) take any key, also one the config
file does not list (`--config.sampling.sampler_options.eta=1.0`): the chosen sampler, schedule or transform says
whether it is valid.
"""
import functools
import importlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxdiff.core.errors import UserError
from jaxdiff.drivers import config_files, edm_import, overrides as overrides_lib

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

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'ml-collections config file (configs/NAME.py).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and samples.')
flags.DEFINE_enum('mode', 'train', list(MODES), 'What to run.')


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


def main(argv, overrides=()):
    del argv
    if FLAGS.config is None:
        raise app.UsageError('--config is required, e.g. --config=configs/quickstart.py')
    if not FLAGS['verbosity'].present:  # keep library INFO logs (orbax) off the console unless asked for
        logging.set_verbosity(logging.ERROR)
    module_name, function_name = MODES[FLAGS.mode].split(':')
    try:
        config = edm_import.resolve(FLAGS.config, FLAGS.workdir)
        overrides_lib.apply(config, overrides)
        run = getattr(importlib.import_module(module_name), function_name)
        run(config, FLAGS.workdir)
    except (UserError, ValueError, FileNotFoundError) as e:
        logging.flush()
        print(f'error: {e}', file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)   # no interpreter teardown: background threads (orbax, prefetch) cannot print tracebacks


def entry():
    argv, overrides = overrides_lib.split(sys.argv)
    sys.argv[:] = argv   # config_flags looks for overrides in sys.argv: it finds none and only loads the file
    check_config_path(argv)
    app.run(functools.partial(main, overrides=overrides), argv=argv)


if __name__ == '__main__':
    entry()
