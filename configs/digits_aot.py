"""Class-conditional EDM on scikit-learn's digits (16x16x1, offline), CPU-sized (configs/quickstart.py's network
with 10 classes), trained with AOT (Kim et al. 2024): pools of 320 images (10 steps of batch 32), one exact
assignment per class inside the pool, so noise never pairs across classes (the authors' conditional recipe).

    python -m jaxdiff.main --config=configs/digits_aot.py --workdir=runs/digits_aot
    python -m jaxdiff.main --config=configs/digits_aot.py --workdir=runs/digits_aot --mode=sample --config.sampling.class_label=3

Sampling draws random classes unless config.sampling.class_label is set (samples.npz holds the labels).
Unconditional: --config.model.label_dim=0 --config.loss.per_class=False.
"""
from configs import aot_common, common


def get_config():
    return common.config(
        model=dict(name='ddpmpp', model_channels=32, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(),
                   dropout=0.0, augment_dim=0, label_dim=10),
        data=dict(name='digits', shape=(16, 16, 1), split='train'),
        loss_fields=aot_common.loss_fields(pool_size=320, per_class=True),
        training_fields=dict(batch_size=32, total_images=32 * 1500, lr=2e-3, lr_rampup_images=10_000,
                             ema_halflife_images=10_000, ema_rampup_ratio=0.1, checkpoint_every_steps=750,
                             keep_checkpoints=2, sample_every_steps=750),
    )
