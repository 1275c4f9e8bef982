"""configs/toy2d_edm.py (eight Gaussians, small MLP) trained with AOT's optimal-transport noise pairing (Kim et al.
2024): pools of 512 points, each paired exactly with 512 unit noises and used for 2 steps of batch 256.

    python -m jaxdiff.main --config=configs/toy2d_aot.py --workdir=runs/toy2d_aot
    python -m jaxdiff.main --config=configs/toy2d_aot.py --workdir=runs/toy2d_aot_sinkhorn --config.loss.coupling_method=sinkhorn

benchmarks/aot_curvature.py compares it with independent pairing (curvature, error vs NFE).
"""
from configs import aot_common, common


def get_config():
    return common.config(
        model=dict(name='mlp', hidden_dim=128, num_layers=3, embedding_dim=64),
        data=dict(name='eight_gaussians', shape=(2,)),
        loss_fields=aot_common.loss_fields(pool_size=512, sigma_data=1.4),
        training_fields=dict(batch_size=256, total_images=2_560_000, lr=1e-3, lr_rampup_images=100_000,
                             ema_halflife_images=50_000, log_every_steps=1_000, checkpoint_every_steps=5_000,
                             keep_checkpoints=2, sample_every_steps=5_000),
        sampling_fields=dict(num_samples=1_000, batch_size=1_000),
    )
