"""AMED-Solver predictor for a trained CIFAR-10 DDPM++ (Zhou et al., CVPR 2024: 10k trajectories, batch 128, Heun
teacher with M = 1, time-uniform grid, AFS), read from a jaxdiff checkpoint trained with configs/cifar_edm.py:

    python -m jaxdiff.main --config=configs/cifar_amed.py --mode=train_amed --workdir=runs/cifar_amed_nfe5 --config.amed.model_workdir=runs/cifar_edm

NFE = 2 (num_points - 1) - afs: num_points 3/4/5/6 with AFS give NFE 3/5/7/9. The AMED-Plugin on iPNDM (the paper's
recipe: polynomial rho = 7 grid, iPNDM teacher with M = 2):

    python -m jaxdiff.main --config=configs/cifar_amed.py --mode=train_amed --workdir=runs/cifar_amed_ipndm_nfe5 --config.amed.model_workdir=runs/cifar_edm --config.amed.base=ipndm --config.amed.schedule=edm --config.amed.teacher=ipndm --config.amed.extra_points=2

The model fields (config.model, data, loss, training) must be those the checkpoint was trained with; they are
copied from configs/cifar_edm.py. The predictor workdir then holds everything sampling needs
(`jaxdiff.amed_train.load_sampler(workdir)`).
"""
from ml_collections import config_dict

from jaxdiff.config_files import sibling


def amed_fields(**overrides):
    """config.amed: the fields of amed_train.train (names = the arguments they feed)."""
    fields = dict(model_workdir=config_dict.placeholder(str),   # workdir of the trained model (its checkpoints/)
                  base=config_dict.placeholder(str),            # None: AMED-Solver; euler | dpm2 | ipndm | dpmpp_2m
                  schedule='time_uniform', num_points=4, sigma_min=0.002, sigma_max=80.0, rho=7.0, afs=True,
                  max_order=4, teacher='heun', extra_points=1, eps_c=0.01, eps_a=0.0,
                  num_trajectories=10_000, batch_size=128, lr=5e-3, seed=0, log_every_rounds=10)
    fields.update(overrides)
    return fields


def get_config():
    config = sibling(__file__, 'cifar_edm').get_config()
    config.amed = amed_fields()
    return config
