"""Quickstart: EDM on scikit-learn's handwritten digits (16x16, offline) on a CPU in a few minutes; writes a grid
of samples to WORKDIR/samples/step_*.png (and checkpoints, so `--mode=sample` works afterwards).

    python -m jaxdiff.main --config=configs/quickstart.py --workdir=runs/quickstart

A small DDPM++ (SongUNet) with EDM's preconditioning, loss and Heun sampler; only the sizes are reduced.
"""
import ml_collections
from ml_collections import config_dict


def get_config():
    config = ml_collections.ConfigDict()
    config.model = dict(name='ddpmpp', model_channels=32, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(),
                        dropout=0.0, augment_dim=0, label_dim=0)
    config.data = dict(name='digits', shape=(16, 16, 1), split='train', augment_p=0.0)
    config.loss = dict(parameterization='edm', target='x0', pairing='independent',
                       sigma_data=0.5, P_mean=-1.2, P_std=1.2)
    config.training = dict(batch_size=32, total_images=32 * 1500, lr=2e-3, lr_rampup_images=10_000,
                           ema_halflife_images=10_000, ema_rampup_ratio=0.1, seed=0, log_every_steps=100,
                           checkpoint_every_steps=750, keep_checkpoints=2, sample_every_steps=750,
                           precision='fp32')
    config.sampling = dict(sampler='heun', schedule='edm', num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                           num_samples=64, batch_size=64, seed=0)
    config.distributed = dict(initialize=False, coordinator_address=config_dict.placeholder(str),
                              num_processes=config_dict.placeholder(int), process_id=config_dict.placeholder(int))
    return config
