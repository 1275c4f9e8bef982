"""EDM's class-conditional CIFAR-10 recipe (Karras et al. 2022: DDPM++, the cond=1 variant) trained with label
dropout 0.1 for classifier-free guidance (Ho & Salimans 2022), sampled with guidance w = 1.5 limited to the interval
sigma in [0.28, 2.9] (Kynkaenniemi et al. 2024, their EDM2 setting in EDM's sigma units; tune it by FID).

    python -m jaxdiff.main --config=configs/cifar_cfg.py --workdir=runs/cifar_cfg
    python -m jaxdiff.main --config=configs/cifar_cfg.py --workdir=runs/cifar_cfg --mode=sample --config.sampling.num_samples=50000 --config.sampling.batch_size=500
    python -m jaxdiff.main --config=configs/cifar_cfg.py --workdir=runs/cifar_cfg --mode=evaluate --config.evaluation.inception_weights=pt_inception-2015-12-05.pkl

Autoguidance with a shorter-trained copy of the same network (Karras et al. 2024 use a smaller and shorter-trained
model; any workdir of the same data and preconditioning works):

    python -m jaxdiff.main --config=configs/cifar_cfg.py --workdir=runs/cifar_cfg_short --config.training.total_images=20000000
    python -m jaxdiff.main --config=configs/cifar_cfg.py --workdir=runs/cifar_cfg --mode=sample --config.sampling.guidance.name=autoguidance --config.sampling.guidance.workdir=runs/cifar_cfg_short --config.sampling.guidance.weight=2.0
"""
from configs import cifar_edm, cifar_fid


def get_config():
    config = cifar_edm.get_config()
    config.model.label_dim = 10
    config.training.label_dropout = 0.1
    config.sampling.guidance = dict(name='cfg', weight=1.5, interval=(0.28, 2.9))
    config.evaluation = cifar_fid.evaluation(num_samples=50_000, reference='data', reference_split='train')
    return config
