"""EDM's unconditional CIFAR-10 recipe with DDPM++ (Karras et al. 2022, Table 7 / App. F.2; EDM's train.py
`--cond=0 --arch=ddpmpp --precond=edm --batch=512 --duration=200 --lr=1e-3 --ema=0.5 --dropout=0.13 --augment=0.12`):

    python -m jaxdiff.main --config=configs/cifar_edm.py --workdir=runs/cifar_edm

A few steps on CPU (compiles the full 55.7M-parameter model; needs the prepared tfds CIFAR-10, see --config.data.data_dir):

    python -m jaxdiff.main --config=configs/cifar_edm.py --workdir=/tmp/cifar_cpu --config.training.batch_size=8 --config.training.total_images=16 --config.training.sample_every_steps=0 --config.sampling.num_samples=8 --config.sampling.batch_size=8

Multi-host: set --config.distributed.initialize=True (see launch/).
"""
from ml_collections import config_dict

from configs import common


def get_config():
    return common.config(
        model=dict(name='ddpmpp'),          # EDM's --arch=ddpmpp preset: 55,733,891 parameters at 32x32x3
        data=dict(name='cifar10', shape=(32, 32, 3), split='train', data_dir=config_dict.placeholder(str)),
        augment_fields=dict(p=0.12),        # EDM's geometric augmentation, probability 0.12
        # EDM: batch 512 (global), 200 Mimg, lr 1e-3 with a 10 Mimg ramp, EMA half-life 0.5 Mimg (common.training)
    )
