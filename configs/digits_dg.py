"""Discriminator guidance on the 16x16 digits model of configs/digits_edm.py: the head reads the frozen model's own
encoder bottleneck ([B, 4, 4, 128], through Denoiser.with_aux), as the authors' head reads ADM's classifier
features.

    python -m jaxdiff.main --config=configs/digits_dg.py --workdir=runs/digits_dg
    python -m jaxdiff.main --config=configs/digits_dg.py --workdir=runs/digits_dg_disc --mode=train_discriminator
    python -m jaxdiff.main --config=configs/digits_dg.py --workdir=runs/digits_dg --mode=sample --config.sampling.guidance.discriminator_workdir=runs/digits_dg_disc

The digits train split has 1500 images (held out: the 297 of the test split), so the discriminator sees each real
image many times: it trains for about 10 passes over the 5000 generated samples (the authors' users found an
early discriminator better than a long-trained one). OT-paired: --config.discriminator.pairing=aot.
"""
from configs import dg_common, digits_edm


def get_config():
    return dg_common.add(
        digits_edm.get_config(),
        discriminator_fields=dict(
            model_workdir='runs/digits_dg',
            network=dict(name='head', model_channels=64, num_blocks=2, num_heads=2),
            features='bottleneck', num_generated=5_000, num_heldout=500, num_steps=800, log_every_steps=100,
            eval_every_steps=200, checkpoint_every_steps=200),
        guidance_fields=dict(weight=2.0))
