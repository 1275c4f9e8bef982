"""Discriminator guidance on the 2-D mixture of eight Gaussians (configs/toy2d_edm.py's model): train the model,
train an MLP discriminator on its samples, sample guided (each a few minutes on a CPU).

    python -m jaxdiff.main --config=configs/toy2d_dg.py --workdir=runs/toy2d_dg
    python -m jaxdiff.main --config=configs/toy2d_dg.py --workdir=runs/toy2d_dg_disc --mode=train_discriminator
    python -m jaxdiff.main --config=configs/toy2d_dg.py --workdir=runs/toy2d_dg --mode=sample --config.sampling.guidance.discriminator_workdir=runs/toy2d_dg_disc

The OT-paired discriminator: --config.discriminator.pairing=aot (and another --workdir). The discriminator reads
x itself (features='none'): the toy model has no convolutional encoder. Its input scale c_in uses sigma_data 1.4
(the data's per-coordinate std), as the model's preconditioning does. lr 1e-3 instead of the authors' 3e-4: the
small MLP fits the 2-D log ratio within 3000 steps at it (benchmarks/dg_exact.py). The guidance window is the
authors' (sigma >= 0.0447, no upper bound); on this toy, closing it above sigma = 1
(--config.sampling.guidance.sigma_max=1.0) gave better samples (benchmarks/RESULTS.md, discriminator guidance).
"""
from configs import dg_common, toy2d_edm


def get_config():
    return dg_common.add(
        toy2d_edm.get_config(),
        discriminator_fields=dict(
            model_workdir='runs/toy2d_dg',
            network=dict(name='mlp', hidden_dim=128, num_layers=3, embedding_dim=64, sigma_data=1.4),
            features='none', num_generated=20_000, num_heldout=2_000, num_steps=3_000, lr=1e-3, log_every_steps=250,
            eval_every_steps=1_000, checkpoint_every_steps=1_000),
        guidance_fields=dict(weight=2.0))
