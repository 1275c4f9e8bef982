"""STF and AOT together: the stable target field (Xu et al. 2023; configs/cifar_stf_ncsnpp.py, reference batch
R = 1024) as the regression target and AOT's optimal-transport noise pairing (Kim et al. 2024; configs/cifar_aot.py:
NCSN++, batch 256, pools of 512) as the pairing. The two compose: AOT provides each step's minibatch (a chunk of
its paired pool), STF then assembles its reference batch from that minibatch plus R - B = 768 other augmented images.

    python -m jaxdiff.main --config=configs/cifar_stf_aot.py --workdir=runs/cifar_stf_aot

Needs the prepared tfds CIFAR-10 (see configs/cifar_edm.py).
"""
from ml_collections import config_dict

from configs import cifar_aot


def get_config():
    config = cifar_aot.get_config()
    config.loss.target = 'stf'
    config.loss.reference_size = 1024
    config.loss.reference_chunk_size = config_dict.placeholder(int)
    return config
