"""STF on scikit-learn's digits (16x16x1, offline), sized for a CPU: configs/quickstart.py plus the stable target
field (Xu et al., ICLR 2023) with a global reference batch of R = 512 of the 1500 training images.

    python -m jaxdiff.main --config=configs/digits_stf.py --workdir=runs/digits_stf
    python -m jaxdiff.main --config=configs/digits_stf.py --workdir=runs/digits_stf --mode=sample

Training writes checkpoints and a sample grid (WORKDIR/samples/step_*.png) at the end; --mode=sample draws more
from the EMA weights. Compare with configs/quickstart.py (the same run with the plain target).
"""
from configs import quickstart


def get_config():
    config = quickstart.get_config()
    config.loss.target = 'stf'
    config.loss.reference_size = 512          # R >= training.batch_size (32), a multiple of the device count
    return config
