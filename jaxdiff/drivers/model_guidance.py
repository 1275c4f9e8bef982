"""Guidance by the model itself: classifier-free guidance and autoguidance, the 'cfg' and 'autoguidance' entries of
the sampling transforms (drivers/sampling.py), built on the pure transforms of core/guidance.py.

    config.sampling.guidance = dict(name='cfg', weight=2.0, interval=None)           # needs model.label_dim > 0
    config.sampling.guidance = dict(name='autoguidance', workdir=W, weight=2.0, config_file=None, interval=None)

weight w: D_w = D_uncond + w (D_cond - D_uncond) (Ho & Salimans 2022), D_w = D_bad + w (D_good - D_bad) (Karras et
al. 2024); w = 1 is the model alone. interval [sigma_lo, sigma_hi] (Kynkaenniemi et al. 2024): guided only there,
the model alone elsewhere; None guides at every sigma. The bad model of autoguidance is the EMA item of `workdir`,
built from the config file `config_file` ('path' or 'path:argument', as --config reads it; None: this run's config, i.e.
a shorter-trained version of the same network).
"""
import math

from jaxdiff.core import guidance
from jaxdiff.core.errors import UserError
from jaxdiff.drivers import config_files, generate, trained as trained_lib


def _interval(interval):
    if interval is None:
        return 0.0, math.inf
    try:
        sigma_lo, sigma_hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise UserError(f'config.sampling.guidance.interval={interval!r} must be [sigma_lo, sigma_hi] or None') \
            from None
    if not 0 <= sigma_lo <= sigma_hi:
        raise UserError(f'config.sampling.guidance.interval={interval!r} needs 0 <= sigma_lo <= sigma_hi')
    return sigma_lo, sigma_hi


def _weight(weight):
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise UserError(f'config.sampling.guidance.weight={weight!r} must be a number')
    return float(weight)


def label_dim_of(config):
    return int(config.model.get('label_dim', 0) or 0)


def classifier_free(config, mesh, sampler, *, weight=2.0, interval=None):
    """(Transform, sampler): D(x, sigma, null) + w (D(x, sigma, c) - D(x, sigma, null)), both in one network call."""
    del mesh
    weight, (sigma_lo, sigma_hi) = _weight(weight), _interval(interval)
    if not label_dim_of(config):
        raise UserError("config.sampling.guidance.name='cfg' needs a class-conditional model (model.label_dim > 0, "
                        'trained with training.label_dropout > 0)')

    def apply(denoiser_fn, variables, class_labels, _):
        return guidance.classifier_free_guided(lambda labels: denoiser_fn(variables, labels), class_labels,
                                               weight=weight, sigma_lo=sigma_lo, sigma_hi=sigma_hi)

    return generate.Transform(apply), sampler


def bad_model_config(config, path):
    """The config of autoguidance's bad model: the file at `path` ('path:argument' passes the argument to
    get_config, as --config does), or this run's config when path is None."""
    if path is None:
        return config
    path, _, argument = str(path).partition(':')
    try:
        module = config_files.load_module(path)
    except FileNotFoundError as e:
        raise UserError(f'config.sampling.guidance.config: {e}') from None
    return module.get_config(argument) if argument else module.get_config()


def autoguidance(config, mesh, sampler, *, workdir=None, weight=2.0, config_file=None, interval=None):
    """(Transform, sampler): D_bad + w (D_good - D_bad), D_bad the EMA item of `workdir`."""
    weight, (sigma_lo, sigma_hi) = _weight(weight), _interval(interval)
    if not workdir:
        raise UserError("config.sampling.guidance.workdir must name the bad model's workdir for autoguidance")
    bad_config = bad_model_config(config, config_file)
    for field, value, bad in (('data.shape', tuple(config.data.shape), tuple(bad_config.data.shape)),
                              ('model.label_dim', label_dim_of(config), label_dim_of(bad_config))):
        if value != bad:
            raise UserError(f'autoguidance: the bad model in {workdir} has {field}={bad}, this model {value}')
    bad = trained_lib.restore(bad_config, workdir, mesh)

    def apply(denoiser_fn, variables, class_labels, bad_variables):
        return guidance.autoguided(denoiser_fn(variables, class_labels), bad.denoiser_fn(bad_variables, class_labels),
                                   weight=weight, sigma_lo=sigma_lo, sigma_hi=sigma_hi)

    return generate.Transform(apply, bad.variables), sampler
