"""Quickstart: EDM on scikit-learn's handwritten digits (16x16, offline) on a CPU in a few minutes; writes a grid
of samples to WORKDIR/samples/step_*.png (and checkpoints, so `--mode=sample` works afterwards).

    python -m jaxdiff.main --config=configs/quickstart.py --workdir=runs/quickstart

A small DDPM++ (SongUNet) with EDM's preconditioning, loss and Heun sampler; only the sizes are reduced.
"""
from configs import common


def get_config():
    return common.config(
        model=dict(name='ddpmpp', model_channels=32, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(),
                   dropout=0.0, augment_dim=0),
        data=dict(name='digits', shape=(16, 16, 1), split='train'),
        training_fields=dict(batch_size=32, total_images=32 * 1500, lr=2e-3, lr_rampup_images=10_000,
                             ema_halflife_images=10_000, ema_rampup_ratio=0.1, checkpoint_every_steps=750,
                             keep_checkpoints=2, sample_every_steps=750),
    )
