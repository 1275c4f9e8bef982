"""AMED-Solver predictor for the small digits model of configs/quickstart.py (16x16x1, 8x8 bottleneck), CPU-sized:

    python -m jaxdiff.main --config=configs/quickstart.py --workdir=runs/quickstart
    python -m jaxdiff.main --config=configs/digits_amed.py --mode=train_amed --workdir=runs/digits_amed_nfe5

The iPNDM plugin instead: add --config.amed.base=ipndm --config.amed.schedule=edm --config.amed.teacher=ipndm
--config.amed.extra_points=2. NFE = 2 (num_points - 1) - afs (num_points 4 with AFS: NFE 5).
"""
from jaxdiff.config_files import sibling


def get_config():
    config = sibling(__file__, 'quickstart').get_config()
    config.amed = sibling(__file__, 'cifar_amed').amed_fields(model_workdir='runs/quickstart', num_trajectories=2048,
                                                     batch_size=64, log_every_rounds=8)
    return config
