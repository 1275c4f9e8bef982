"""Mode `train_amed`: fit an AMED predictor to a teacher solver on a trained checkpoint (jaxdiff.drivers.amed_train).

    python -m jaxdiff.main --config=configs/digits_amed.py --mode=train_amed --workdir=runs/digits_amed_nfe5

Reads only the EMA item of config.amed.model_workdir's newest readable checkpoint; writes the predictor checkpoint
and its settings (`amed.json`) to the workdir, so `--config.sampling.predictor_workdir=WORKDIR` samples with it.
"""
import os

from jaxdiff.drivers import amed_train, generate, mesh as mesh_lib
from jaxdiff import models
from jaxdiff.core.errors import UserError
from jaxdiff.models.amed_predictor import AMEDPredictor
from jaxdiff.core.samplers import amed


def describe_model(config, model_workdir, step):
    """What a predictor is tied to: the network config, data shape, parameterization and checkpoint."""
    return dict(model=dict(config.model), data_shape=list(config.data.shape), loss=dict(config.loss),
                workdir=os.path.abspath(model_workdir), step=int(step))


def run(config, workdir):
    """Trains the AMED predictor named by config.amed for the checkpoint in config.amed.model_workdir; writes the
    predictor checkpoint and settings to `workdir`, and prints the teacher-matching loss."""
    if not workdir:
        raise UserError('--workdir is required for --mode=train_amed (where the predictor checkpoint goes)')
    a = config.amed
    if not a.model_workdir:
        raise UserError('config.amed.model_workdir must name the trained model\'s workdir (its checkpoints/)')
    if a.base not in amed.BASES:
        raise UserError(f'amed.base must be None or one of {", ".join(amed.BASES[1:])}, got {a.base!r}')
    if getattr(config.model, 'label_dim', 0):
        raise UserError('train_amed supports unconditional models only (model.label_dim must be 0)')
    trained = generate.restore(config, a.model_workdir, mesh_lib.make_mesh())
    make_denoiser = trained.denoiser_fn
    sample_shape = tuple(config.data.shape)
    module = AMEDPredictor(num_bottleneck=amed_train.bottleneck_size(make_denoiser(trained.variables), sample_shape),
                           eps_c=a.eps_c, eps_a=a.eps_a)
    schedule_options = dict(a.get('schedule_options') or {})
    sigmas, teacher_sigmas = amed_train.grids(schedule=a.schedule, num_points=a.num_points, sigma_min=a.sigma_min,
                                              sigma_max=a.sigma_max, rho=a.rho, extra_points=a.extra_points,
                                              schedule_options=schedule_options)
    settings = amed_train.make_settings(
        module, model=describe_model(config, a.model_workdir, trained.step), schedule=a.schedule,
        num_points=a.num_points, sigma_min=a.sigma_min, sigma_max=a.sigma_max, rho=a.rho, afs=a.afs, base=a.base,
        max_order=a.max_order, teacher=a.teacher, extra_points=a.extra_points,
        num_trajectories=a.num_trajectories, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
        schedule_options=schedule_options, lower_order_final=a.get('lower_order_final'))
    params = amed_train.init_params(module, sigmas, a.seed)
    print(f'AMED ({a.base or "solver"}, NFE {settings["nfe"]}, {a.schedule} N={a.num_points}, afs={a.afs}) '
          f'against {a.teacher} with {a.extra_points} extra point(s) per interval; predictor '
          f'{models.count_params(params):,} parameters, bottleneck {module.num_bottleneck} values', flush=True)
    params, history = amed_train.train_predictor(
        make_denoiser, trained.variables, module, params=params, sample_shape=sample_shape, sigmas=sigmas,
        teacher_sigmas=teacher_sigmas, base=a.base, afs=a.afs, max_order=a.max_order, teacher=a.teacher,
        extra_points=a.extra_points, num_trajectories=a.num_trajectories, batch_size=a.batch_size, lr=a.lr,
        seed=a.seed, log_every=a.log_every_rounds, lower_order_final=a.get('lower_order_final'))
    amed_train.save_predictor(workdir, params, settings)
    print(f'teacher-matching loss: first round {history[0]:.4g}, last round {history[-1]:.4g}; predictor saved to '
          f'{os.path.abspath(workdir)} ({amed_train.SETTINGS_FILE} + checkpoints/)', flush=True)
    return params, settings
