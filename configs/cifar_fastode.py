"""Fast-ODE on unconditional CIFAR-10, the authors' recipe (Lee, Kim, Ye, ICML 2023; github.com/sangyun884/fast-ode
README: `train_reverse_img_ddp.py --weight_prior 20 --learning_rate 2e-4 --dataset cifar10 --warmup_steps 5000
--optimizer adam --batchsize 128 --iterations 500000 --config_en configs/cifar10_en.json --config_de
configs/cifar10_de.json`):

    python -m jaxdiff.main --config=configs/cifar_fastode.py --workdir=runs/cifar_fastode
    python -m jaxdiff.main --config=configs/cifar_fastode.py --workdir=runs/cifar_fastode --mode=sample --config.sampling.sampler=dpmpp_2m
    python -m jaxdiff.main --config=configs/cifar_fastode.py --workdir=runs/cifar_fastode --mode=sample --config.sampling.sampler=euler --config.sampling.schedule=flow_uniform --config.sampling.schedule_options.num_steps=20

Differences from EDM's recipe (configs/cifar_edm.py), as a table:

| field                  | here                                      | authors                                 |
|------------------------|-------------------------------------------|-----------------------------------------|
| loss                   | flow, pairing fastode, beta 20            | rectified flow + encoder, weight_prior 20 |
| model                  | ddpmpp, augment_dim 0 (55,732,739 params) | cifar10_de.json (55.732739M)            |
| encoder                | fastode_encoder: 32 ch, (2, 2, 2), 2 blocks, attention at 16, dropout 0.13 | cifar10_en.json |
| batch / iterations     | 128 / total_images 64M (500k steps)       | 128 / 500k                              |
| lr / warm-up           | 2e-4 / lr_rampup_images 640k (5k steps)   | 2e-4 / 5k steps, linear                 |
| optimizer              | Adam (0.9, 0.999, 1e-8), one for both nets | Adam, same                             |
| EMA                    | half-life 887,184 images, no ramp-up = 0.9999 per step | EMA 0.9999, both nets  |
| augmentation           | horizontal flips only                     | RandomHorizontalFlip                    |
| sampling               | EDM's Heun and grid, 35 NFE (see below)   | Euler / Heun in t on uniform t          |

Generation never uses the encoder (z ~ N(0, I)); every sampler runs on the flow through `flow.precond`. Sigma-space
Heun wants a geometric grid: on the uniform-t grid ('flow_uniform') its first step extrapolates
(`flow.uniform_schedule`); Euler there is the authors' Euler.
configs/cifar_rectified_flow.py is the independent baseline. Needs the prepared tfds CIFAR-10 (configs/cifar_edm.py).
"""
from ml_collections import config_dict

from configs import common, fastode_common

BATCH = 128


def get_config(pairing='fastode'):
    config = common.config(
        model=dict(name='ddpmpp', augment_dim=0),          # the authors' cifar10_de.json: no augmentation labels
        data=dict(name='cifar10', shape=(32, 32, 3), split='train', data_dir=config_dict.placeholder(str)),
        loss_fields=fastode_common.loss_fields(beta=20.0, pairing=pairing),
        augment_fields=fastode_common.flips(),
        training_fields=dict(batch_size=BATCH, total_images=500_000 * BATCH, lr=2e-4, lr_rampup_images=5_000 * BATCH,
                             ema_halflife_images=fastode_common.ema_halflife_images(0.9999, BATCH),
                             ema_rampup_ratio=None, checkpoint_every_steps=5_000),
    )
    config.encoder = dict(name='fastode_encoder', model_channels=32, channel_mult=(2, 2, 2), num_blocks=2,
                          attn_resolutions=(16,), dropout=0.13)   # cifar10_en.json
    return config
