"""The released STF checkpoint's recipe (github.com/Newbeeer/stf): NCSN++ with R = 1024 (FID 1.90 at 35 NFE):

    python -m jaxdiff.main --config=configs/cifar_stf_ncsnpp.py --workdir=runs/cifar_stf_ncsnpp
"""
from configs import cifar_stf


def get_config():
    config = cifar_stf.get_config()
    config.model = dict(name='ncsnpp')       # EDM's --arch=ncsnpp preset (Fourier embedding, residual encoder)
    config.loss.reference_size = 1024
    return config
