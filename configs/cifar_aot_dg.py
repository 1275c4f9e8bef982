"""Discriminator guidance with an OT-paired discriminator on the AOT authors' unconditional CIFAR-10 model
(configs/cifar_aot.py; AOT reports 1.68 FID unconditional, 1.58 conditional, at 29 NFE with DG): the head of
configs/cifar_dg.py on the model's bottleneck, trained with the perturbation noise paired to each half of the batch
by AOT's exact assignment (jaxdiff.drivers.discriminator_training: how AOT trains its discriminator is not public, this is
a choice), sampled with EDM's Heun at 15 steps (29 NFE).

    python -m jaxdiff.main --config=configs/cifar_aot_dg.py --workdir=runs/cifar_aot
    python -m jaxdiff.main --config=configs/cifar_aot_dg.py --workdir=runs/cifar_aot_dg_disc --mode=train_discriminator
    python -m jaxdiff.main --config=configs/cifar_aot_dg.py --workdir=runs/cifar_aot --mode=sample --config.sampling.guidance.discriminator_workdir=runs/cifar_aot_dg_disc --config.sampling.num_samples=50000 --config.sampling.batch_size=500

The same discriminator with independent noise, to compare: --config.discriminator.pairing=independent.
"""
from configs import cifar_aot, dg_common


def get_config():
    config = cifar_aot.get_config()
    config.sampling.schedule_options.update(num_steps=15)
    return dg_common.add(
        config,
        discriminator_fields=dict(
            model_workdir='runs/cifar_aot',
            network=dict(name='head', model_channels=128, num_blocks=2, num_heads=2),
            features='bottleneck', pairing='aot', num_generated=50_000, num_heldout=2_000, num_steps=8_000,
            log_every_steps=100, eval_every_steps=1_000, checkpoint_every_steps=1_000),
        guidance_fields=dict(weight=2.0))
