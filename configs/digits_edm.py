"""EDM on scikit-learn's handwritten digits at 16x16x1 (offline, no download): a small DDPM++ and the EDM recipe.

    python -m jaxdiff.main --config=configs/digits_edm.py --workdir=runs/digits_edm

Sized for one accelerator (about an hour on a GPU); configs/quickstart.py is the CPU-sized version.
"""
from configs import common


def get_config():
    return common.config(
        model=dict(name='ddpmpp', model_channels=64, channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(8,),
                   dropout=0.1),
        data=dict(name='digits', shape=(16, 16, 1), split='train'),
        augment_fields=dict(p=0.12, xflip=0.0),          # no mirrored digits; EDM's other augmentations on
        training_fields=dict(batch_size=256, total_images=20_000_000, lr_rampup_images=1_000_000,
                             ema_halflife_images=200_000, log_every_steps=200, sample_every_steps=10_000),
        sampling_fields=dict(num_samples=100, batch_size=100),
    )
