"""Config files by path: `configs/NAME.py` modules with `get_config()`, as absl's --config flag loads them.

Recipes import their shared sections and each other as the package `configs` (`from configs import common`);
`make_importable` puts the folder above a config file's folder on sys.path, so that works from any directory
(main.py calls it before absl loads the file). The one loader for tests, benchmarks and notebooks.
"""
import importlib.util
import os
import sys

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DIR = os.path.join(REPOSITORY, 'configs')


def make_importable(path):
    """sys.path gets the parent of the folder holding config file `path` (so `import configs.X` resolves)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:
        sys.path.insert(0, root)


def load_module(path):
    """The config file at `path` as a module."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'config file not found: {path}')
    make_importable(path)
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f'jaxdiff_config_{name}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(path, overrides=None):
    """get_config() of the file at `path` with dotted `overrides`, e.g. {'training.batch_size': 8}."""
    config = load_module(path).get_config()
    for field, value in (overrides or {}).items():
        *groups, key = field.split('.')
        section = config
        for group in groups:
            section = section[group]
        section[key] = value
    return config


def named(name, **overrides):
    """configs/NAME.py of this checkout with dotted overrides (tests, benchmarks): named('quickstart', **{...})."""
    return load(os.path.join(CONFIG_DIR, f'{name}.py'), overrides)
