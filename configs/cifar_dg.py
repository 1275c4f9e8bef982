"""Discriminator guidance on EDM's CIFAR-10 model (Kim et al. 2023: EDM 2.03 -> 1.77 FID unconditional, 1.82 ->
1.64 conditional): configs/cifar_edm.py's DDPM++, a head on its frozen encoder bottleneck ([B, 8, 8, 256]; the
authors' head reads ADM's classifier, which is not available here), trained on 50k real vs 50k generated images
for about 10 epochs, guidance w = 2 on the first evaluation of each Heun step while tau >= 0.01.

    python -m jaxdiff.main --config=configs/cifar_dg.py --workdir=runs/cifar_dg
    python -m jaxdiff.main --config=configs/cifar_dg.py --workdir=runs/cifar_dg_disc --mode=train_discriminator
    python -m jaxdiff.main --config=configs/cifar_dg.py --workdir=runs/cifar_dg --mode=sample --config.sampling.guidance.discriminator_workdir=runs/cifar_dg_disc --config.sampling.num_samples=50000 --config.sampling.batch_size=500

Conditional (EDM's --cond=1: 10 labels; the head gets the label; the authors' w = 1, their boosting optional):

    python -m jaxdiff.main --config=configs/cifar_dg.py:cond --workdir=runs/cifar_dg_cond
    python -m jaxdiff.main --config=configs/cifar_dg.py:cond --workdir=runs/cifar_dg_cond_disc --mode=train_discriminator
    python -m jaxdiff.main --config=configs/cifar_dg.py:cond --workdir=runs/cifar_dg_cond --mode=sample --config.sampling.guidance.discriminator_workdir=runs/cifar_dg_cond_disc --config.sampling.guidance.boosting=True

Needs the prepared tfds CIFAR-10 (see configs/cifar_edm.py); held-out real images: its test split.
"""
from configs import cifar_edm, dg_common

VARIANTS = ('uncond', 'cond')


def get_config(variant='uncond'):
    if variant not in VARIANTS:
        raise ValueError(f'configs/cifar_dg.py:{variant}; valid variants: {", ".join(VARIANTS)}')
    cond = variant == 'cond'
    config = cifar_edm.get_config()
    config.model.label_dim = 10 if cond else 0
    suffix = '_cond' if cond else ''
    return dg_common.add(
        config,
        discriminator_fields=dict(
            model_workdir=f'runs/cifar_dg{suffix}',
            network=dict(name='head', model_channels=128, num_blocks=2, num_heads=2, label_dim=10 if cond else 0),
            features='bottleneck', num_generated=50_000, num_heldout=2_000, num_steps=8_000,
            log_every_steps=100, eval_every_steps=1_000, checkpoint_every_steps=1_000),
        guidance_fields=dict(weight=1.0 if cond else 2.0))
