"""Sampling preset of the AOT authors' conditional model: EDM's Heun on EDM's grid with rho 72 and 15 steps
(29 NFE; reported FID 1.73), random classes, for a workdir trained with configs/cifar_aot_cond.py.

    python -m jaxdiff.main --config=configs/cifar_aot_cond_sample_rho72.py --workdir=runs/cifar_aot_cond --mode=sample --config.sampling.num_samples=50000 --config.sampling.batch_size=200

The same grid for any recipe: --config.sampling.schedule_options.rho=72 --config.sampling.schedule_options.num_steps=15
"""
from configs import cifar_aot_cond


def get_config():
    config = cifar_aot_cond.get_config()
    config.sampling.schedule_options.update(rho=72.0, num_steps=15)
    return config
