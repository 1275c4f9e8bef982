"""configs/toy2d_fastode.py (the authors' 2-D recipe: tanh MLPs of 100 units, beta 10, lr 1e-3, batch 512) on the
eight Gaussians of configs/toy2d_edm.py (radius 2, mode std 0.1), whose exact samples and denoiser are known.

    python -m jaxdiff.main --config=configs/toy2d_fastode_eight_gaussians.py --workdir=runs/toy2d8_fastode
    python -m jaxdiff.main --config=configs/toy2d_fastode_eight_gaussians.py --workdir=runs/toy2d8_rf --config.loss.pairing=independent

| field | here                         | configs/toy2d_fastode.py |
|-------|------------------------------|--------------------------|
| data  | eight_gaussians (radius 2)   | two_gaussians            |
"""
from configs import toy2d_fastode


def get_config():
    config = toy2d_fastode.get_config()
    config.data = dict(name='eight_gaussians', shape=(2,))
    return config
