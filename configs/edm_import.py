"""EDM's networks in jaxdiff (`--mode=import_edm`, jaxdiff.convert.edm): import once, then every mode runs on the
imported workdir with this same config: the import writes WORKDIR/imported_config.json (the network's config.model,
data shape, config.loss = its preconditioning, and the sampling grid clipped to its sigma range as EDM's
generate.py does), and every mode reads it there (jaxdiff.drivers.edm_import.resolve) before the command line's
--config.FIELD overrides. EDM's CIFAR-10 models (DDPM++ with VP, NCSN++ with VE, conditional and unconditional):

    wget https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl
    python -m jaxdiff.main --config=configs/edm_import.py --workdir=runs/edm_uncond_vp --mode=import_edm --config.edm_import.path=edm-cifar10-32x32-uncond-vp.pkl
    python -m jaxdiff.main --config=configs/edm_import.py --workdir=runs/edm_uncond_vp --mode=sample
    python -m jaxdiff.main --config=configs/edm_import.py --workdir=runs/edm_uncond_vp --mode=evaluate --config.evaluation.protocol=edm --config.evaluation.reference=$HOME/.cache/jaxdiff/cifar10-32x32.npz

(the other three: edm-cifar10-32x32-{cond-vp,uncond-ve,cond-ve}.pkl; EDM's reference statistics:
https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz, the Inception weights: configs/cifar_fid.py).
Modes whose --workdir is a new directory name the imported one as the config's argument:

    python -m jaxdiff.main --config=configs/edm_import.py:runs/edm_uncond_vp --workdir=runs/edm_uncond_vp_amed --mode=train_amed
    python -m jaxdiff.main --config=configs/edm_import.py:runs/edm_uncond_vp --workdir=runs/edm_uncond_vp_disc --mode=train_discriminator

A state dict (torch.save'd .pt / .pth, or .npz, EDM's names) says its preconditioning:
--config.edm_import.path=net.pt --config.edm_import.precond=vp (constants: --config.edm_import.precond_constants.beta_d=...).
The imported workdir: which one is given as `:WORKDIR` (config.edm_import.workdir), else the command line's
--workdir. Before the import (or for a workdir without imported_config.json) the sections are configs/cifar_edm.py's.
A conditional network (label_dim > 0) also gets config.edm_import.conditional: configs/cifar_dg.py:cond's
discriminator and guidance. Data: CIFAR-10 (config.data, used by reference=data and the discriminator's real
images); for EDM's 64x64 models give an .npz reference instead.
"""
from ml_collections import config_dict

from configs import cifar_amed, cifar_dg, cifar_edm, cifar_fid


def edm_import_fields(workdir=None):
    """config.edm_import: the arguments of jaxdiff.convert.edm.load (None: the file's or EDM's value), the imported
    workdir when it is not --workdir, and what a conditional network changes."""
    f = lambda: config_dict.placeholder(float)   # one placeholder per field: a shared one links the fields
    return dict(path=config_dict.placeholder(str), precond=config_dict.placeholder(str),
                precond_constants=dict(sigma_data=f(), P_mean=f(), P_std=f(), beta_d=f(), beta_min=f(),
                                       M=config_dict.placeholder(int), epsilon_t=f(), sigma_min=f(), sigma_max=f()),
                overrides=dict(dropout=f(), label_dropout=f()),
                workdir=config_dict.placeholder(str) if workdir is None else workdir,
                conditional=dict(discriminator=dict(network=dict(label_dim=10)),   # configs/cifar_dg.py:cond
                                 sampling=dict(guidance=dict(weight=1.0))))


def get_config(workdir=None):
    config = cifar_edm.get_config()
    config.edm_import = edm_import_fields(workdir)
    config.evaluation = cifar_fid.evaluation(num_samples=50_000, reference='data', reference_split='train')
    config.sampling.num_samples = 64
    config.sampling.batch_size = 64
    grid = config.sampling.schedule_options
    model_workdir = {'model_workdir': workdir} if workdir else {}
    config.amed = cifar_amed.amed_fields(sigma_min=grid.sigma_min, sigma_max=grid.sigma_max, **model_workdir)
    dg = cifar_dg.get_config('uncond')   # the discriminator of configs/cifar_dg.py
    config.discriminator = dg.discriminator
    config.discriminator.model_workdir = workdir
    config.sampling.guidance = dg.sampling.guidance
    return config
