"""The AOT authors' class-conditional CIFAR-10 recipe (Kim et al. 2024, github.com/large-scale-kim/EDM-AOT README:
`train.py --cond 1 --arch ncsnpp --batch 256 --aot 2048`): configs/cifar_aot.py with the 10 class labels and pools
of 2048 images (8 steps per pool), one exact assignment per class inside the pool. Reported FID 1.79 at 35 NFE and
1.73 at 29 NFE (rho 72, 15 steps: configs/cifar_aot_cond_sample_rho72.py).

    python -m jaxdiff.main --config=configs/cifar_aot_cond.py --workdir=runs/cifar_aot_cond
    python -m jaxdiff.main --config=configs/cifar_aot_cond_sample_rho72.py --workdir=runs/cifar_aot_cond --mode=sample
    python -m jaxdiff.main --config=configs/cifar_aot_cond.py --workdir=runs/cifar_aot_cond --mode=sample --config.sampling.class_label=3

Sampling draws random classes unless config.sampling.class_label is set.
"""
from configs import cifar_aot


def get_config():
    config = cifar_aot.get_config()
    config.model.label_dim = 10
    config.loss.pool_size = 2048
    config.loss.per_class = True
    return config
