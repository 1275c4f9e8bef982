"""Sections shared by every recipe; a recipe file lists only what differs (big_vision style tables).

Each function returns one config section as a dict whose keys are the arguments they feed: config.model ->
`models.build(name, **fields)` (the preset of `name` plus the fields given), config.loss -> `losses.build`,
config.augment -> `augment.augment`, config.sampling -> `samplers.get` / `schedules.get` (SPEC.md),
config.training -> `train_step` (EDM's training_loop.py names).
"""
import ml_collections
from ml_collections import config_dict


def loss(**fields):
    """EDM's loss: log-normal sigma (P_mean -1.2, P_std 1.2), preconditioning and weight with sigma_data 0.5."""
    return dict(dict(parameterization='edm', target='x0', pairing='independent', sigma_data=0.5, P_mean=-1.2,
                     P_std=1.2), **fields)


def augment(p=0.0, **fields):
    """EDM's geometric augmentation (jaxdiff.core.augment.augment keyword arguments); p = 0 switches it off."""
    return dict(p=p, **fields)


def training(**fields):
    """EDM's optimizer, ramp and EMA fields; batch_size is global (split over all devices of all hosts)."""
    return dict(dict(batch_size=512, total_images=200_000_000, lr=1e-3, lr_rampup_images=10_000_000,
                     ema_halflife_images=500_000, ema_rampup_ratio=0.05, seed=0, precision='fp32',
                     parallelism='jit', log_every_steps=100, checkpoint_every_steps=5_000, keep_checkpoints=3,
                     sample_every_steps=20_000, label_dropout=0.0), **fields)


def edm_grid(**fields):
    """schedule_options of EDM's grid (Karras et al. 2022, eq. 5): 18 steps, rho 7 (the 'edm' default)."""
    return dict(dict(num_steps=18, sigma_min=0.002, sigma_max=80.0), **fields)


def sampling(**fields):
    """EDM's deterministic Heun on its grid (35 NFE); any sampler / schedule / option by name (SPEC.md)."""
    return dict(dict(sampler='heun', sampler_options={}, schedule='edm', schedule_options=edm_grid(),
                     predictor_workdir=config_dict.placeholder(str), class_label=config_dict.placeholder(int),
                     num_samples=64, batch_size=64, seed=0), **fields)


def distributed():
    """jax.distributed.initialize arguments (None: auto-detected on SLURM, Cloud TPU, ...; see launch/)."""
    return dict(initialize=False, coordinator_address=config_dict.placeholder(str),
                num_processes=config_dict.placeholder(int), process_id=config_dict.placeholder(int))


def config(*, model, data, loss_fields=None, augment_fields=None, training_fields=None, sampling_fields=None):
    """A full run config from the sections' differences."""
    c = ml_collections.ConfigDict()
    c.model = model
    c.data = data
    c.loss = loss(**(loss_fields or {}))
    c.augment = augment(**(augment_fields or {}))
    c.training = training(**(training_fields or {}))
    c.sampling = sampling(**(sampling_fields or {}))
    c.distributed = distributed()
    return c
