"""EDM's unconditional CIFAR-10 recipe (configs/cifar_edm.py: DDPM++, batch 512, 200 Mimg) trained with the stable
target field of Xu, Tong, Jaakkola, Tian (ICLR 2023) and the paper's default reference batch R = 4096:

    python -m jaxdiff.main --config=configs/cifar_stf.py --workdir=runs/cifar_stf

Each step the reference batch is the (augmented) minibatch plus R - B = 3584 other augmented training images, shared
by all devices (a global reference; the authors' code uses one per GPU). R must be >= the batch size and a multiple
of the number of devices. The released checkpoints (github.com/Newbeeer/stf) used R = 1024 with NCSN++
(configs/cifar_stf_ncsnpp.py). Needs the prepared tfds CIFAR-10 (see configs/cifar_edm.py).
"""
from ml_collections import config_dict

from configs import cifar_edm


def get_config():
    config = cifar_edm.get_config()
    config.loss.target = 'stf'
    config.loss.reference_size = 4096                                 # R, global; the paper's default
    config.loss.reference_chunk_size = config_dict.placeholder(int)   # None: all R at once (4 MiB of logits per 64)
    return config
