"""EDM networks as jaxdiff workdirs (what `--mode=import_edm` does; the mapping itself is jaxdiff.convert.edm):
a converted network is saved as checkpoint 0 with only the 'ema' item ({'params': {'model': ...}, 'model_state':
the model's other collections, e.g. NCSN++'s 'buffers'}), and WORKDIR/imported_config.json holds the sections a
config needs to rebuild it (config.model, the data shape, config.loss = the preconditioning, the sampling grid
clipped to the network's sigma range). Every mode then runs on it: `resolve` (called by jaxdiff.main before the
command-line overrides) overlays those sections on a config that has an `edm_import` section
(configs/edm_import.py), read from the imported workdir, which is config.edm_import.workdir or else --workdir.
"""
import json
import math
import os

import jax
import numpy as np

from jaxdiff.drivers import checkpoint as checkpoint_lib, mesh as mesh_lib, train_step, trained as trained_lib
from jaxdiff.core import precond as precond_lib
from jaxdiff.core.errors import UserError

IMPORTED_FILE = 'imported_config.json'
LOAD_ARGUMENTS = ('path', 'precond', 'precond_constants', 'overrides')   # config.edm_import -> convert.edm.load


def network_sigma_range(loss, info):
    """(sigma_min, sigma_max) the network was trained on: the pickle's attributes, else from the preconditioning's
    constants (VP: sigma(epsilon_t), sigma(1), EDM eq. / Table 1; VE: its sigma_min, sigma_max; EDM: 0, inf)."""
    if info.get('sigma_min') is not None and info.get('sigma_max') is not None:
        return float(info['sigma_min']), float(info['sigma_max'])
    if loss['parameterization'] == 'vp':
        sigma = lambda t: float(precond_lib.vp_sigma_of_t(t, beta_d=loss['beta_d'], beta_min=loss['beta_min']))
        return sigma(loss['epsilon_t']), sigma(1.0)
    if loss['parameterization'] == 've':
        return float(loss['sigma_min']), float(loss['sigma_max'])
    return 0.0, math.inf


def sampling_range(schedule_options, network_range):
    """The grid's sigma range clipped to the network's, as EDM's generate.py does
    (sigma_min = max(sigma_min, net.sigma_min), sigma_max = min(sigma_max, net.sigma_max))."""
    return (max(float(schedule_options['sigma_min']), network_range[0]),
            min(float(schedule_options['sigma_max']), network_range[1]))


def ema_item(variables):
    """The checkpoint's 'ema' item of converted variables: {'params': {'model': ...}, 'model_state': {...}}."""
    return {'params': {'model': variables['params']},
            'model_state': {name: tree for name, tree in variables.items() if name != 'params'}}


def not_none(section):
    """The entries of a config section that are set (None: the file's or EDM's default)."""
    return {k: v for k, v in dict(section or {}).items() if v is not None}


def check_against_config(config, network):
    """The EMA item's shapes that `trained.restore` will ask for, under the imported config, equal the converted
    variables' (so every mode that restores reads them)."""
    _, modules, _ = trained_lib.networks_of(config)
    wanted = train_step.abstract_ema(config, {'model': modules['model']}, mesh_lib.make_mesh())
    got = ema_item(network.variables)
    flat_wanted = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_flatten_with_path(wanted)[0]}
    flat_got = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_flatten_with_path(got)[0]}
    if flat_wanted != flat_got:
        differing = sorted(set(flat_wanted) ^ set(flat_got)) or sorted(
            k for k in flat_wanted if flat_wanted[k] != flat_got[k])
        raise UserError(f'the imported network does not match the SongUNet of its config at {differing[0]}')


def imported_config(config, network):
    """What `resolve` overlays on the config: JSON-able sections of the imported network."""
    sigma_min, sigma_max = sampling_range(config.sampling.schedule_options,
                                          network_sigma_range(network.loss, network.info))
    plain = lambda v: list(v) if isinstance(v, tuple) else v
    return dict(model={k: plain(v) for k, v in network.model_fields.items()},
                data_shape=list(network.data_shape), loss=dict(network.loss),
                sampling_schedule_options=dict(sigma_min=sigma_min, sigma_max=sigma_max),
                source=dict(network.info, edm_import={k: not_none(v) if hasattr(v, 'items') else v
                                                      for k, v in dict(config.edm_import).items()
                                                      if k in LOAD_ARGUMENTS}))


def read_imported(workdir):
    """The sections WORKDIR/imported_config.json holds, or None when there is none."""
    path = os.path.join(os.path.expanduser(workdir), IMPORTED_FILE) if workdir else None
    if not path or not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def apply_imported(config, imported):
    """config with the imported sections in place: model, data.shape, loss, and the network's sigma range as the
    range of the sampling grid (and of AMED's grid, when the config has an `amed` section)."""
    with config.unlocked():
        config.model = dict(imported['model'])
        config.data.shape = tuple(imported['data_shape'])
        config.loss = dict(imported['loss'])
        for name, value in imported['sampling_schedule_options'].items():
            config.sampling.schedule_options[name] = value
            if 'amed' in config:
                config.amed[name] = value
    return config


def _update(section, changes):
    """Sets the (nested) fields of `changes` in `section`."""
    for name, value in changes.items():
        if hasattr(value, 'items') and hasattr(section[name], 'items'):
            _update(section[name], value)
        else:
            section[name] = value


def resolve(config, workdir):
    """The config a mode runs, for a config with an `edm_import` section (configs/edm_import.py); any other config
    is returned as it is. The imported workdir is config.edm_import.workdir, else `workdir` (--workdir); it is
    the model workdir of AMED and discriminator training unless they name one. When it holds imported_config.json,
    the imported sections apply (`apply_imported`), and for a conditional network (label_dim > 0) the fields of
    config.edm_import.conditional too. Without one (before the import) the config keeps its own sections."""
    if 'edm_import' not in config:
        return config
    imported_workdir = config.edm_import.get('workdir') or workdir
    with config.unlocked():
        for section in ('amed', 'discriminator'):
            if imported_workdir and section in config and not config[section].get('model_workdir'):
                config[section].model_workdir = imported_workdir
    imported = read_imported(imported_workdir)
    if imported is None:
        return config
    apply_imported(config, imported)
    if int(imported['model'].get('label_dim') or 0):
        with config.unlocked():
            _update(config, config.edm_import.get('conditional') or {})
    return config


def check_new_workdir(workdir):
    """A UserError when `workdir` already holds checkpoints (an imported one would not be the newest)."""
    directory = checkpoint_lib.directory_of(workdir)
    if os.path.isdir(directory) and os.listdir(directory):
        raise UserError(f'{directory} already holds checkpoints; import into a new --workdir')


def save(config, network, workdir):
    """Checks `network` against the imported config, writes checkpoint 0 ('ema' only) and imported_config.json;
    returns the imported sections."""
    check_new_workdir(workdir)
    imported = imported_config(config, network)
    check_against_config(apply_imported(config.copy_and_resolve_references(), imported), network)
    os.makedirs(workdir, exist_ok=True)
    checkpoints = checkpoint_lib.Checkpoints(workdir, keep_checkpoints=1)
    try:
        checkpoints.save(0, None, ema=jax.tree.map(np.asarray, ema_item(network.variables)))
        checkpoints.wait_until_finished()
    finally:
        checkpoints.close()
    with open(os.path.join(workdir, IMPORTED_FILE), 'w') as f:
        json.dump(imported, f, indent=1, default=str)
    return imported
