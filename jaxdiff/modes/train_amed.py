"""Mode `train_amed`: fit an AMED predictor to a teacher solver on a trained checkpoint (jaxdiff.drivers.amed_train).

    python -m jaxdiff.main --config=configs/digits_amed.py --mode=train_amed --workdir=runs/digits_amed_nfe5

Reads only the EMA item of config.amed.model_workdir's newest readable checkpoint; writes the predictor checkpoints
and its settings (`amed.json`) to the workdir, so `--config.sampling.predictor_workdir=WORKDIR` samples with it.
An interrupted run (SIGTERM) resumes from the workdir's newest readable checkpoint.
"""
import os

import jax

from jaxdiff import models
from jaxdiff.core.errors import UserError
from jaxdiff.drivers import amed_train, mesh as mesh_lib, trained as trained_lib, workdir_lock


def describe_model(config, model_workdir, step):
    """What a predictor is tied to: the network config, data shape, parameterization and checkpoint."""
    return dict(model=dict(config.model), data_shape=list(config.data.shape), loss=dict(config.loss),
                workdir=os.path.abspath(model_workdir), step=int(step))


def run(config, workdir):
    """Trains the AMED predictor named by config.amed for the checkpoint in config.amed.model_workdir; writes the
    predictor checkpoints and settings to `workdir`, and prints the teacher-matching loss."""
    if not workdir:
        raise UserError('--workdir is required for --mode=train_amed (where the predictor checkpoint goes)')
    settings = amed_train.settings_of(config)
    if not settings.model_workdir:
        raise UserError('config.amed.model_workdir must name the trained model\'s workdir (its checkpoints/)')
    if getattr(config.model, 'label_dim', 0):
        raise UserError('train_amed supports unconditional models only (model.label_dim must be 0)')
    trained = trained_lib.restore(config, settings.model_workdir, mesh_lib.make_mesh())
    sample_shape = tuple(config.data.shape)
    module = amed_train.predictor_module(settings, trained.denoiser_fn(trained.variables), sample_shape)
    sigmas, _ = settings.grids()
    num_params = models.count_params(jax.eval_shape(lambda: amed_train.init_params(module, sigmas, settings.seed)))
    nfe = amed_train.describe(settings, module)['nfe']
    print(f'AMED ({settings.base or "solver"}, NFE {nfe}, {settings.schedule} N={settings.num_points}, '
          f'afs={settings.afs}) against {settings.teacher} with {settings.extra_points} extra point(s) per interval; '
          f'predictor {num_params:,} parameters, bottleneck {module.num_bottleneck} values', flush=True)
    with workdir_lock.hold(workdir, enabled=jax.process_index() == 0):
        params, history = amed_train.train_predictor(
            trained.denoiser_fn, trained.variables, module, settings, sample_shape=sample_shape, workdir=workdir,
            model=describe_model(config, settings.model_workdir, trained.step))
    if len(history):
        print(f'teacher-matching loss: first round {history[0]:.4g}, last round {history[-1]:.4g}; ', end='')
    print(f'predictor saved to {os.path.abspath(workdir)} ({amed_train.SETTINGS_FILE} + checkpoints/)', flush=True)
    return params, amed_train.describe(settings, module, describe_model(config, settings.model_workdir,
                                                                          trained.step))
