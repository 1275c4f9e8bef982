"""Config sections of discriminator guidance (Kim, Kim, Kwon, Kang, Moon, ICML 2023; jaxdiff.drivers.discriminator_training):
config.discriminator (training the discriminator: `--mode=train_discriminator`) and config.sampling.guidance
(guided sampling everywhere the model samples). Every DG recipe lists all fields, so each can be set from the
command line (--config.discriminator.pairing=aot, --config.sampling.guidance.weight=1.0, ...).
"""
from ml_collections import config_dict

from jaxdiff.drivers import discriminator_guidance, discriminator_training


def discriminator(*, model_workdir, network, **fields):
    """The authors' training: VP importance-sampled sigma, independent noise, BCE, Adam lr 3e-4 with weight decay
    1e-7, batch 128, 50k generated samples (all defaults of discriminator_training.FIELDS)."""
    section = dict(discriminator_training.FIELDS, model_workdir=model_workdir, network=network,
                   generated_path=config_dict.placeholder(str))
    unknown = sorted(set(fields) - set(section))
    if unknown:
        raise ValueError(f'dg_common.discriminator: no field {unknown[0]}')
    return dict(section, **fields)


def guidance(**fields):
    """config.sampling.guidance: off until discriminator_workdir names a trained discriminator; the authors' w = 2,
    guidance while VP time tau >= 0.01 (sigma >= 0.0447), first evaluation of each Heun step only, no boosting."""
    return dict(dict(discriminator_guidance.DEFAULTS, name='discriminator',
                     discriminator_workdir=config_dict.placeholder(str)), **fields)


def add(config, *, discriminator_fields, guidance_fields=None):
    """The two DG sections added to a model recipe's config."""
    config.discriminator = discriminator(**discriminator_fields)
    config.sampling.guidance = guidance(**(guidance_fields or {}))
    return config
