"""Sampling preset of the AOT authors' unconditional model: EDM's Heun on EDM's grid with rho 90 and 14 steps
(27 NFE; reported FID 1.88), for a workdir trained with configs/cifar_aot.py.

    python -m jaxdiff.main --config=configs/cifar_aot_sample_rho90.py --workdir=runs/cifar_aot --mode=sample --config.sampling.num_samples=50000 --config.sampling.batch_size=200

The same grid for any recipe: --config.sampling.schedule_options.rho=90 --config.sampling.schedule_options.num_steps=14
"""
from configs import cifar_aot


def get_config():
    config = cifar_aot.get_config()
    config.sampling.schedule_options.update(rho=90.0, num_steps=14)
    return config
