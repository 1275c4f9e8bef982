"""Class-conditional EDM on scikit-learn's digits (16x16x1, offline) trained with label dropout, so that one network
is both the conditional and the unconditional model of classifier-free guidance (Ho & Salimans 2022): each
example's label is the null label (the all-zero one-hot row) with probability training.label_dropout = 0.1
(k-diffusion's cond_dropout_rate). CPU-sized like configs/quickstart.py.

    python -m jaxdiff.main --config=configs/digits_cfg.py --workdir=runs/digits_cfg
    python -m jaxdiff.main --config=configs/digits_cfg.py --workdir=runs/digits_cfg --mode=sample --config.sampling.class_label=3
    python -m jaxdiff.main --config=configs/digits_cfg.py --workdir=runs/digits_cfg --mode=sample --config.sampling.guidance.weight=1.0
    python -m jaxdiff.main --config=configs/digits_cfg.py --workdir=runs/digits_cfg --mode=evaluate

Guidance (config.sampling.guidance): w = 2 inside sigma in [0.05, 20] (Kynkaenniemi et al. 2024: guidance limited
to an interval), conditional model alone outside; w = 1 is the conditional model without guidance. Autoguidance
instead guides the model with a shorter-trained version of itself (Karras et al. 2024), conditional or not:

    python -m jaxdiff.main --config=configs/digits_cfg.py --workdir=runs/digits_cfg_short --config.training.total_images=8000
    python -m jaxdiff.main --config=configs/digits_cfg.py --workdir=runs/digits_cfg --mode=sample --config.sampling.guidance.name=autoguidance --config.sampling.guidance.workdir=runs/digits_cfg_short --config.sampling.guidance.weight=2.0
"""
from configs import cifar_fid, quickstart


def get_config():
    config = quickstart.get_config()
    config.model.label_dim = 10
    config.training.label_dropout = 0.1
    config.sampling.guidance = dict(name='cfg', weight=2.0, interval=(0.05, 20.0))
    config.sampling.batch_size = 500
    config.evaluation = cifar_fid.evaluation(num_samples=1500, metric='digits', kid=True, feature_batch_size=100,
                                             reference='data', reference_split='train')     # as configs/digits_eval.py
    return config
