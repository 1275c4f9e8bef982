"""AMED-Solver predictor for the small digits model of configs/quickstart.py (16x16x1, 8x8 bottleneck), CPU-sized:

    python -m jaxdiff.main --config=configs/quickstart.py --workdir=runs/quickstart
    python -m jaxdiff.main --config=configs/digits_amed.py --mode=train_amed --workdir=runs/digits_amed_nfe5
    python -m jaxdiff.main --config=configs/digits_amed.py --workdir=runs/quickstart --mode=sample --config.sampling.sampler=amed --config.sampling.predictor_workdir=runs/digits_amed_nfe5

NFE = 2 (num_points - 1) - afs (num_points 4 with AFS: NFE 5). The iPNDM plugin: --config.amed.base=ipndm
--config.amed.schedule=edm --config.amed.schedule_options={} --config.amed.teacher=ipndm --config.amed.extra_points=2
(as configs/cifar_amed_ipndm.py; EDM's grid takes no epsilon_s).
"""
from configs import cifar_amed, quickstart


def get_config():
    config = quickstart.get_config()
    config.amed = cifar_amed.amed_fields(model_workdir='runs/quickstart', num_trajectories=2048, batch_size=64,
                                         log_every_rounds=8)
    return config
