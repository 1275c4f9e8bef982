"""EDM's networks in jaxdiff (`--mode=import_edm`, jaxdiff.convert.edm): import once, then every mode runs on the
imported workdir with this same config, which reads WORKDIR/imported_config.json (the network's config.model,
data shape, config.loss = its preconditioning, and the sampling grid clipped to its sigma range as EDM's
generate.py does). EDM's CIFAR-10 models (DDPM++ with VP, NCSN++ with VE, conditional and unconditional):

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
The imported workdir: which one is given as `:WORKDIR`, else the command line's --workdir. Before the import (or for a
workdir without imported_config.json) the sections are configs/cifar_edm.py's. Data: CIFAR-10 (config.data, used
by reference=data and the discriminator's real images); for EDM's 64x64 models give an .npz reference instead.
"""
import sys

from ml_collections import config_dict

from configs import cifar_amed, cifar_dg, cifar_edm, cifar_fid
from jaxdiff.drivers import edm_import


def workdir_of_command_line(argv=None):
    """The value of --workdir on the command line (None without one)."""
    argv = sys.argv if argv is None else argv
    for i, arg in enumerate(argv):
        if arg.startswith('--workdir='):
            return arg.split('=', 1)[1]
        if arg == '--workdir' and i + 1 < len(argv):
            return argv[i + 1]
    return None


def edm_import_fields():
    """config.edm_import: the arguments of jaxdiff.convert.edm.load (None: the file's or EDM's value)."""
    f = lambda: config_dict.placeholder(float)   # one placeholder per field: a shared one links the fields
    return dict(path=config_dict.placeholder(str), precond=config_dict.placeholder(str),
                precond_constants=dict(sigma_data=f(), P_mean=f(), P_std=f(), beta_d=f(), beta_min=f(),
                                       M=config_dict.placeholder(int), epsilon_t=f(), sigma_min=f(), sigma_max=f()),
                overrides=dict(dropout=f(), label_dropout=f()))


def get_config(workdir=None):
    workdir = workdir or workdir_of_command_line()
    imported = edm_import.read_imported(workdir)
    config = cifar_edm.get_config()
    config.edm_import = edm_import_fields()
    config.evaluation = cifar_fid.evaluation(num_samples=50_000, reference='data', reference_split='train')
    config.sampling.num_samples = 64
    config.sampling.batch_size = 64
    label_dim = 0
    if imported is not None:
        edm_import.apply_imported(config, imported)
        label_dim = int(imported['model'].get('label_dim', 0))
    model_workdir = {'model_workdir': workdir} if workdir else {}
    grid = config.sampling.schedule_options
    config.amed = cifar_amed.amed_fields(sigma_min=grid.sigma_min, sigma_max=grid.sigma_max, **model_workdir)
    dg = cifar_dg.get_config('cond' if label_dim else 'uncond')   # the discriminator of configs/cifar_dg.py
    config.discriminator = dg.discriminator
    config.discriminator.model_workdir = workdir
    config.sampling.guidance = dg.sampling.guidance
    return config
