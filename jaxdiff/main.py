"""Command line: `python -m jaxdiff.main --config=configs/NAME.py --workdir=DIR [--mode=MODE] [--config.FIELD=VALUE ...]`.

One function per mode, each `run(config, workdir)` in its own module, imported only when chosen; no logic here.
"""
import importlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxdiff.errors import UserError

MODES = {
    'train': 'jaxdiff.train:train',
    'sample': 'jaxdiff.sample:sample',
    'summary': 'jaxdiff.summary:summary',
    'bench_solvers': 'jaxdiff.bench_solvers:run',
    'bench_gmm_ddim': 'jaxdiff.bench_gmm_ddim:run',
    'train_amed': 'jaxdiff.amed_train:train',
}

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'ml-collections config file (configs/NAME.py).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and samples.')
flags.DEFINE_enum('mode', 'train', list(MODES), 'What to run.')


def main(argv):
    del argv
    if FLAGS.config is None:
        raise app.UsageError('--config is required, e.g. --config=configs/quickstart.py')
    if not FLAGS['verbosity'].present:  # keep library INFO logs (orbax) off the console unless asked for
        logging.set_verbosity(logging.WARNING)
    module_name, function_name = MODES[FLAGS.mode].split(':')
    run = getattr(importlib.import_module(module_name), function_name)
    try:
        run(FLAGS.config, FLAGS.workdir)
    except (UserError, ValueError, FileNotFoundError) as e:
        logging.flush()
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    app.run(main)
