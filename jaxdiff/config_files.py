"""Config files by path: `configs/NAME.py` modules with `get_config()`, as absl's --config flag loads them.

The one loader for config files that build on one another (cifar_stf extends cifar_edm), tests and benchmarks.
"""
import importlib.util
import os

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def load_module(path):
    """The config file at `path` as a module (its helpers, e.g. cifar_amed.amed_fields, become usable)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'config file not found: {path}')
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


def sibling(config_file, name):
    """Module configs/NAME.py next to `config_file` (pass __file__), so a config works from any directory."""
    return load_module(os.path.join(os.path.dirname(os.path.abspath(config_file)), f'{name}.py'))


def named(name, **overrides):
    """configs/NAME.py of this checkout with dotted overrides (tests, benchmarks): named('quickstart', **{...})."""
    return load(os.path.join(CONFIG_DIR, f'{name}.py'), overrides)
