"""Fast-ODE on the authors' 2-D toy (Lee, Kim, Ye, ICML 2023, train_reverse_2d_joint.py): two Gaussians
N((-8, 8), diag(3, 0.1)) and N((8, 8), diag(3, 0.1)), flow network and encoder MLPs with 100 tanh units, beta 10,
Adam lr 1e-3, batch 512, 100k iterations (a few minutes on a CPU).

    python -m jaxdiff.main --config=configs/toy2d_fastode.py --workdir=runs/toy2d_fastode
    python -m jaxdiff.main --config=configs/toy2d_fastode.py --workdir=runs/toy2d_rf --config.loss.pairing=independent
    python -m jaxdiff.main --config=configs/toy2d_fastode.py --workdir=runs/toy2d_fastode --mode=sample --config.sampling.sampler=dpmpp_2m

| field        | here                                                  | authors                                       |
|--------------|-------------------------------------------------------|-----------------------------------------------|
| data         | two_gaussians, fresh samples, both modes per batch    | 100k samples per mode, batches alternate  |
| prior        | N(0, I)                                               | N(0, diag(36, 1)); --no_wide_prior: N(0, I) |
| model        | tanh_mlp (2 hidden layers of 100, time fed raw)       | MLP, same                                     |
| encoder      | fastode_mlp_encoder (the same MLP, t = 1, 4 outputs)  | MLP(output_dim=4)                             |
| EMA          | short (half-life 100 steps)                           | none (they sample the raw weights)            |
| warm-up      | none                                                  | none                                          |
| sampling     | Euler, 20 steps uniform in t                          | Euler, N = 20                                 |

configs/toy2d_fastode_eight_gaussians.py is the same recipe on the eight Gaussians.
"""
from configs import common, fastode_common

BATCH = 512


def get_config():
    config = common.config(
        model=dict(name='tanh_mlp', hidden_dim=100, num_layers=2),
        data=dict(name='two_gaussians', shape=(2,)),
        loss_fields=fastode_common.loss_fields(beta=10.0),
        training_fields=dict(batch_size=BATCH, total_images=100_000 * BATCH, lr=1e-3, lr_rampup_images=0,
                             ema_halflife_images=100 * BATCH, ema_rampup_ratio=None, log_every_steps=5_000,
                             checkpoint_every_steps=20_000, keep_checkpoints=2, sample_every_steps=50_000),
        sampling_fields=fastode_common.sampling_fields(sampler='euler', num_steps=20, num_samples=2_000,
                                                       batch_size=2_000),
    )
    config.encoder = dict(name='fastode_mlp_encoder', hidden_dim=100, num_layers=2)
    return config
