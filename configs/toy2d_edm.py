"""EDM on a 2-D mixture of eight Gaussians with a small MLP denoiser (about a minute on a CPU).

    python -m jaxdiff.main --config=configs/toy2d_edm.py --workdir=runs/toy2d_edm

The data (radius 2, mode std 0.1) has per-coordinate std ~1.4, used as sigma_data. Samples are drawn as a
scatter plot (WORKDIR/samples/step_*.png).
"""
import ml_collections
from ml_collections import config_dict


def get_config():
    config = ml_collections.ConfigDict()
    config.model = dict(name='mlp', hidden_dim=128, num_layers=3, embedding_dim=64)
    config.data = dict(name='eight_gaussians', shape=(2,), augment_p=0.0)
    config.loss = dict(parameterization='edm', target='x0', pairing='independent',
                       sigma_data=1.4, P_mean=-1.2, P_std=1.2)
    config.training = dict(batch_size=256, total_images=2_560_000, lr=1e-3, lr_rampup_images=100_000,
                           ema_halflife_images=50_000, ema_rampup_ratio=0.05, seed=0, log_every_steps=1_000,
                           checkpoint_every_steps=5_000, keep_checkpoints=2, sample_every_steps=5_000,
                           precision='fp32')
    config.sampling = dict(sampler='heun', schedule='edm', num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                           num_samples=1_000, batch_size=1_000, seed=0)
    config.distributed = dict(initialize=False, coordinator_address=config_dict.placeholder(str),
                              num_processes=config_dict.placeholder(int), process_id=config_dict.placeholder(int))
    return config
