"""STF on scikit-learn's digits (16x16x1, offline), sized for a CPU: configs/quickstart.py plus the stable target
field (Xu et al., ICLR 2023) with a global reference batch of R = 512 of the 1500 training images.

    python -m jaxdiff.main --config=configs/digits_stf.py --workdir=runs/digits_stf
    python -m jaxdiff.main --config=configs/digits_stf.py --workdir=runs/digits_stf --mode=sample

Training writes checkpoints and a sample grid (WORKDIR/samples/step_*.png) at the end; --mode=sample draws more
from the EMA weights. Compare with configs/quickstart.py (the same run with the plain target).
"""
import importlib.util
import os


def _sibling(name):
    """configs/NAME.py loaded by path, so this file works from any working directory."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config():
    config = _sibling('quickstart').get_config()
    config.loss.target = 'stf'
    config.loss.reference_size = 512          # R >= training.batch_size (64), a multiple of the device count
    return config
