"""EDM on scikit-learn's handwritten digits at 16x16x1 (offline, no download): a small DDPM++ and the EDM recipe.

    python -m jaxdiff.main --config=configs/digits_edm.py --workdir=runs/digits_edm

Sized for one accelerator (about an hour on a GPU); configs/quickstart.py is the CPU-sized version.
"""
import ml_collections
from ml_collections import config_dict


def get_config():
    config = ml_collections.ConfigDict()
    config.model = dict(name='ddpmpp', model_channels=64, channel_mult=(1, 2, 2), num_blocks=2,
                        attn_resolutions=(8,), dropout=0.1, augment_dim=9, label_dim=0)
    config.data = dict(name='digits', shape=(16, 16, 1), split='train',
                       augment_p=0.12, augment_xflip=0.0)   # no mirrored digits; other EDM augmentations on
    config.loss = dict(parameterization='edm', target='x0', pairing='independent',
                       sigma_data=0.5, P_mean=-1.2, P_std=1.2)
    config.training = dict(batch_size=256, total_images=20_000_000, lr=1e-3, lr_rampup_images=1_000_000,
                           ema_halflife_images=200_000, ema_rampup_ratio=0.05, seed=0, log_every_steps=200,
                           checkpoint_every_steps=5_000, keep_checkpoints=3, sample_every_steps=10_000,
                           precision='fp32')
    config.sampling = dict(sampler='heun', schedule='edm', num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                           num_samples=100, batch_size=100, seed=0)
    config.distributed = dict(initialize=False, coordinator_address=config_dict.placeholder(str),
                              num_processes=config_dict.placeholder(int), process_id=config_dict.placeholder(int))
    return config
