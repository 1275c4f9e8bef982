"""Mode `import_edm`: an EDM network (Karras et al. 2022) -> a jaxdiff workdir whose 'ema' checkpoint item samples,
evaluates and feeds AMED / discriminator training like a trained jaxdiff run (jaxdiff.convert.edm does the mapping).

    python -m jaxdiff.main --config=configs/edm_import.py --workdir=runs/edm_cifar_uncond_vp --mode=import_edm \
        --config.edm_import.path=edm-cifar10-32x32-uncond-vp.pkl
    python -m jaxdiff.main --config=configs/edm_import.py --workdir=runs/edm_cifar_uncond_vp --mode=sample

config.edm_import: path (EDM's network-snapshot-*.pkl / published edm-*.pkl, or a state dict .pt / .pth / .npz),
precond ('edm' | 'vp' | 've': required for a state dict, read from a pickle), precond_constants (None entries: the
pickle's or EDM's defaults), overrides (SongUNet fields, e.g. dropout for fine-tuning).

Writes WORKDIR/checkpoints/0 (item 'ema' only: there is no optimizer state to resume) and
WORKDIR/imported_config.json (config.model, data shape, config.loss, the sampling grid's sigma range, the source),
which every later mode reads from the imported workdir (`jaxdiff.drivers.edm_import.resolve`, called by
jaxdiff.main for a config with an edm_import section, such as configs/edm_import.py), so that config gives every
mode the imported network.
"""
import json
import os

import jax
import numpy as np

from jaxdiff.drivers import config_files, edm_import
from jaxdiff.convert import edm
from jaxdiff.core.errors import UserError

CONFIG_FILE = os.path.join(config_files.CONFIG_DIR, 'edm_import.py')


def run(config, workdir):
    """Converts config.edm_import.path into `workdir`; returns the converted `edm.Network`."""
    if not workdir:
        raise UserError('--workdir is required for --mode=import_edm (where the imported checkpoint goes)')
    if 'edm_import' not in config or not config.edm_import.get('path'):
        raise UserError('config.edm_import.path must name an EDM network (network-snapshot-*.pkl, edm-*.pkl or a '
                        'state dict); see configs/edm_import.py')
    e = config.edm_import
    edm_import.check_new_workdir(workdir)   # before reading a 200 MB pickle
    network = edm.load(e.path, precond=e.get('precond'),
                       precond_constants=edm_import.not_none(e.get('precond_constants')),
                       overrides=edm_import.not_none(e.get('overrides')))
    imported = edm_import.save(config, network, workdir)
    describe(network, imported, workdir)
    return network


def describe(network, imported, workdir):
    """What was imported, and the command lines that use it."""
    fields = network.model_fields
    count = sum(int(np.size(v)) for v in jax.tree.leaves(network.variables['params']))
    grid = imported['sampling_schedule_options']
    config = os.path.relpath(CONFIG_FILE)
    config = CONFIG_FILE if config.startswith('..') else config
    print(f'imported {network.info.get("class_name")} {fields["name"]} ({count:,} parameters, '
          f'{"x".join(map(str, imported["data_shape"]))}, label_dim {fields.get("label_dim", 0)}, '
          f'loss {json.dumps(network.loss)}) from {network.info["source"]} into {os.path.abspath(workdir)}; '
          f'sampling grid sigma {grid["sigma_min"]:.4g}..{grid["sigma_max"]:.4g}', flush=True)
    print('use it with:', flush=True)
    for mode in ('sample', 'evaluate'):
        print(f'  python -m jaxdiff.main --config={config} --workdir={workdir} --mode={mode}', flush=True)
    for mode, out in (('train_amed', 'amed'), ('train_discriminator', 'disc')):
        print(f'  python -m jaxdiff.main --config={config}:{workdir} --workdir={workdir.rstrip(os.sep)}_{out} '
              f'--mode={mode}', flush=True)
