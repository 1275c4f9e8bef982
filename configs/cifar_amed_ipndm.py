"""AMED-Plugin on iPNDM for a trained CIFAR-10 DDPM++ (Zhou et al., CVPR 2024: polynomial rho = 7 grid, iPNDM
teacher with M = 2 extra points per interval):

    python -m jaxdiff.main --config=configs/cifar_amed_ipndm.py --mode=train_amed --workdir=runs/cifar_amed_ipndm_nfe5 --config.amed.model_workdir=runs/cifar_edm
"""
from configs import cifar_amed


def get_config():
    config = cifar_amed.get_config()
    config.amed = cifar_amed.amed_fields(base='ipndm', schedule='edm', schedule_options={}, teacher='ipndm',
                                         extra_points=2)
    return config
