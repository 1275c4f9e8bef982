"""EDM's unconditional CIFAR-10 recipe with DDPM++ (Karras et al. 2022, Table 7 / App. F.2; EDM's train.py
`--cond=0 --arch=ddpmpp --precond=edm --batch=512 --duration=200 --lr=1e-3 --ema=0.5 --dropout=0.13 --augment=0.12`):

    python -m jaxdiff.main --config=configs/cifar_edm.py --workdir=runs/cifar_edm

A few steps on CPU (compiles the full 55.7M-parameter model; needs the prepared tfds CIFAR-10, see --config.data.data_dir):

    python -m jaxdiff.main --config=configs/cifar_edm.py --workdir=/tmp/cifar_cpu --config.training.batch_size=8 --config.training.total_images=16 --config.training.sample_every_steps=0 --config.sampling.num_samples=8 --config.sampling.batch_size=8

Multi-host: set --config.distributed.initialize=True (see launch/).
"""
import ml_collections
from ml_collections import config_dict


def get_config():
    config = ml_collections.ConfigDict()
    # DDPM++ (EDM's --arch=ddpmpp): 55,733,891 trainable parameters at 32x32x3.
    config.model = dict(name='ddpmpp', model_channels=128, channel_mult=(2, 2, 2), channel_mult_emb=4, num_blocks=4,
                        attn_resolutions=(16,), dropout=0.13, augment_dim=9, label_dim=0,
                        embedding_type='positional', channel_mult_noise=1, encoder_type='standard',
                        decoder_type='standard', resample_filter=(1, 1))
    config.data = dict(name='cifar10', shape=(32, 32, 3), split='train', data_dir=config_dict.placeholder(str),
                       augment_p=0.12)                       # EDM's geometric augmentation, probability 0.12
    config.loss = dict(parameterization='edm', target='x0', pairing='independent',
                       sigma_data=0.5, P_mean=-1.2, P_std=1.2)
    config.training = dict(
        batch_size=512,                 # global, split over all devices of all hosts
        total_images=200_000_000,       # 200 Mimg
        lr=1e-3,
        lr_rampup_images=10_000_000,    # 10 Mimg linear ramp
        ema_halflife_images=500_000,    # 0.5 Mimg
        ema_rampup_ratio=0.05,
        seed=0,
        precision='fp32',               # fp32 | tf32 | bf16 (jaxdiff.precision)
        log_every_steps=100,
        checkpoint_every_steps=5_000,   # ~2.5 Mimg, EDM's snapshot interval
        keep_checkpoints=3,
        sample_every_steps=20_000,
    )
    config.sampling = dict(sampler='heun', schedule='edm', num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                           num_samples=64, batch_size=64, seed=0)   # EDM's deterministic Heun: 35 NFE
    config.distributed = dict(initialize=False, coordinator_address=config_dict.placeholder(str),
                              num_processes=config_dict.placeholder(int), process_id=config_dict.placeholder(int))
    return config
