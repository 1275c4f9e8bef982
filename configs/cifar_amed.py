"""AMED-Solver predictor for a trained CIFAR-10 DDPM++ (Zhou et al., CVPR 2024: 10k trajectories, batch 128, Heun
teacher with M = 1, time-uniform grid, AFS), read from a jaxdiff workdir trained with configs/cifar_edm.py:

    python -m jaxdiff.main --config=configs/cifar_amed.py --mode=train_amed --workdir=runs/cifar_amed_nfe5 --config.amed.model_workdir=runs/cifar_edm
    python -m jaxdiff.main --config=configs/cifar_amed.py --mode=sample --workdir=runs/cifar_edm --config.sampling.sampler=amed --config.sampling.predictor_workdir=runs/cifar_amed_nfe5

NFE = 2 (num_points - 1) - afs: num_points 3/4/5/6 with AFS give NFE 3/5/7/9. The AMED-Plugin on iPNDM is
configs/cifar_amed_ipndm.py. The model fields (config.model, data, loss) must be those the checkpoint was trained
with; they come from configs/cifar_edm.py.
"""
from ml_collections import config_dict

from configs import cifar_edm


def amed_fields(**fields):
    """config.amed: the fields of `amed_train.Settings` (the predictor, its grid and its training)."""
    return dict(dict(model_workdir=config_dict.placeholder(str),   # workdir of the trained model (its checkpoints/)
                     base=config_dict.placeholder(str),            # None: AMED-Solver; euler | dpm2 | ipndm | dpmpp_2m
                     schedule='time_uniform',                      # the authors' grid: VP time uniform on
                     schedule_options=dict(epsilon_s=1e-3),         # [1e-3, 1], beta fitted to the sigma range
                     num_points=4, sigma_min=0.002, sigma_max=80.0, rho=7.0, afs=True,
                     max_order=4, lower_order_final=config_dict.placeholder(bool),   # None: True on dpmpp_2m
                     teacher='heun', extra_points=1, eps_c=0.01, eps_a=0.0,
                     num_trajectories=10_000, batch_size=128, lr=5e-3, seed=0, log_every_rounds=10,
                     checkpoint_every_rounds=10), **fields)


def get_config():
    config = cifar_edm.get_config()
    config.amed = amed_fields()
    return config
