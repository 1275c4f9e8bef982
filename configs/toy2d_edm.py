"""EDM on a 2-D mixture of eight Gaussians with a small MLP denoiser (about a minute on a CPU).

    python -m jaxdiff.main --config=configs/toy2d_edm.py --workdir=runs/toy2d_edm
    python -m jaxdiff.main --config=configs/toy2d_edm.py --workdir=runs/toy2d_edm --mode=sample --config.sampling.sampler=dpmpp_2m --config.sampling.schedule=logsnr

The data (radius 2, mode std 0.1) has per-coordinate std ~1.4, used as sigma_data. Samples are drawn as a
scatter plot (WORKDIR/samples/step_*.png).
"""
from configs import common


def get_config():
    return common.config(
        model=dict(name='mlp', hidden_dim=128, num_layers=3, embedding_dim=64),
        data=dict(name='eight_gaussians', shape=(2,)),
        loss_fields=dict(sigma_data=1.4),
        training_fields=dict(batch_size=256, total_images=2_560_000, lr=1e-3, lr_rampup_images=100_000,
                             ema_halflife_images=50_000, log_every_steps=1_000, checkpoint_every_steps=5_000,
                             keep_checkpoints=2, sample_every_steps=5_000),
        sampling_fields=dict(num_samples=1_000, batch_size=1_000),
    )
