"""The AOT authors' unconditional CIFAR-10 recipe (Kim et al. 2024, github.com/large-scale-kim/EDM-AOT README:
`train.py --cond 0 --arch ncsnpp --batch 256 --aot 512`): EDM's NCSN++ and loss, total batch 256, noise paired by an
exact assignment (Euclidean distance between the augmented image and the unit noise) over pools of 512 images, each
pool used for 2 steps. Reported FID 1.95 at 35 NFE (EDM's Heun grid, the default sampling here) and 1.88 at 27 NFE
(rho 90, 14 steps: configs/cifar_aot_sample_rho90.py).

    python -m jaxdiff.main --config=configs/cifar_aot.py --workdir=runs/cifar_aot
    python -m jaxdiff.main --config=configs/cifar_aot_sample_rho90.py --workdir=runs/cifar_aot --mode=sample

The pool here is global (one assignment over all 512 images of all devices). The authors' pool is per GPU (their
help text calls it the total): on their 4 GPUs each solved 4 assignments of 512 per 8 steps; --config.loss.pool_size
=2048 keeps their 8 steps per pool with one global assignment. Everything else is EDM's CIFAR-10 recipe
(configs/cifar_edm.py: lr 1e-3, 10 Mimg ramp, EMA 0.5 Mimg, dropout 0.13, augmentation 0.12, 200 Mimg).
Needs the prepared tfds CIFAR-10 (see configs/cifar_edm.py).
"""
from ml_collections import config_dict

from configs import aot_common, common


def get_config():
    return common.config(
        model=dict(name='ncsnpp', label_dim=0),     # EDM's --arch=ncsnpp preset (unconditional)
        data=dict(name='cifar10', shape=(32, 32, 3), split='train', data_dir=config_dict.placeholder(str)),
        loss_fields=aot_common.loss_fields(pool_size=512),
        augment_fields=dict(p=0.12),
        training_fields=dict(batch_size=256),
    )
