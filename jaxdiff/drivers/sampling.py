"""config.sampling -> objects: the one place that reads it (SPEC.md).

    plan = from_config(config, mesh)            # sampler, grid, denoiser transform
    generator = generator(config, mesh, trained, progress='sampling')

Fields: sampler + sampler_options (keyword arguments of `samplers.get`), schedule + schedule_options (of
`schedules.get`), predictor_workdir (a learned sampler's workdir: its saved settings fix the sampler and the grid),
guidance (dict(name=<a registered transform>, **its options); {} for none), num_samples, batch_size, seed,
class_label (None: random labels for a conditional model).

Both registries are `name -> 'module:factory'` tables imported on demand:
  LEARNED     sampler name -> load(workdir) -> (sampler, sigmas)
  TRANSFORMS  guidance name -> build(config, mesh, sampler, **options) -> (generate.Transform or None, sampler);
              the options are the factory's keyword-only arguments (an unknown one is an error listing them), and
              a transform may hand back another sampler (discriminator guidance's Heun becomes the authors' sampler)
"""
import importlib
import inspect
from typing import NamedTuple, Optional

from jaxdiff.core import samplers, schedules
from jaxdiff.core.errors import UserError
from jaxdiff.drivers import generate, precision

LEARNED = {'amed': 'jaxdiff.drivers.amed_train:load_sampler'}
TRANSFORMS = {'discriminator': 'jaxdiff.drivers.discriminator_guidance:build',
              'cfg': 'jaxdiff.drivers.model_guidance:classifier_free',
              'autoguidance': 'jaxdiff.drivers.model_guidance:autoguidance'}


class Plan(NamedTuple):
    sampler: object
    sigmas: object
    transform: Optional[generate.Transform]


def _load(table, name):
    module_name, attr = table[name].split(':')
    return getattr(importlib.import_module(module_name), attr)


def sampler_and_grid(sampling):
    """(sampler, sigmas) named by config.sampling; an unknown sampler, schedule or option is a one-line error."""
    workdir = sampling.get('predictor_workdir')
    if workdir:
        if sampling.sampler not in LEARNED:
            raise UserError(f'config.sampling.predictor_workdir holds a learned sampler: set config.sampling.sampler '
                            f'to one of {", ".join(sorted(LEARNED))} (got {sampling.sampler!r})')
        return _load(LEARNED, sampling.sampler)(workdir)
    try:
        sampler = samplers.get(sampling.sampler, **dict(sampling.get('sampler_options') or {}))
        sigmas = schedules.get(sampling.schedule, **dict(sampling.get('schedule_options') or {}))
    except ValueError as e:
        raise UserError(f'config.sampling: {e}') from None
    return sampler, sigmas


def transform_options(sampling):
    """(name, options) of config.sampling.guidance, or (None, {}) when it is empty."""
    given = dict(sampling.get('guidance') or {})
    if not given:
        return None, {}
    name = given.pop('name', None)
    if name not in TRANSFORMS:
        raise UserError(f'config.sampling.guidance.name={name!r} is not a registered transform; valid names: '
                        f'{", ".join(sorted(TRANSFORMS))}')
    return name, given


def check_options(name, build, options):
    valid = [p.name for p in inspect.signature(build).parameters.values() if p.kind == p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UserError(f'config.sampling.guidance ({name}) has no field {unknown[0]}; valid fields: '
                        f'name, {", ".join(valid)}')


def check(config):
    """Fails on a bad sampler, schedule, option or transform name before any checkpoint is read."""
    sampler_and_grid(config.sampling)
    name, options = transform_options(config.sampling)
    if name is not None:
        check_options(name, _load(TRANSFORMS, name), options)


def from_config(config, mesh, *, guided=True):
    """The sampler, grid and denoiser transform of config.sampling (guided=False: no transform, e.g. to draw a
    model's own samples)."""
    sampler, sigmas = sampler_and_grid(config.sampling)
    name, options = transform_options(config.sampling)
    if name is None or not guided:
        return Plan(sampler, sigmas, None)
    build = _load(TRANSFORMS, name)
    check_options(name, build, options)
    transform, sampler = build(config, mesh, sampler, **options)
    return Plan(sampler, sigmas, transform)


def generator(config, mesh, denoiser_fn, *, guided=True, progress=None):
    """A `generate.Generator` of config.sampling for the denoisers denoiser_fn(variables, class_labels) -> D."""
    sampling, label_dim = config.sampling, int(config.model.get('label_dim', 0) or 0)
    class_label = sampling.get('class_label')
    if class_label is not None and not 0 <= int(class_label) < max(label_dim, 1):
        raise UserError(f'config.sampling.class_label={class_label} is not a class of this model '
                        f'(model.label_dim={label_dim})')
    plan = from_config(config, mesh, guided=guided)
    return generate.Generator(
        denoiser_fn, plan.sampler, plan.sigmas, sample_shape=tuple(config.data.shape), batch_size=sampling.batch_size,
        seed=sampling.seed, mesh=mesh, label_dim=label_dim, class_label=class_label, transform=plan.transform,
        matmul_precision=lambda fn: precision.with_matmul_precision(fn, precision.from_config(config)),
        progress=progress)


def describe(info):
    """A run's cost per sample as one phrase: '35 NFE, 35 network and 0 gradient evaluations'."""
    text = f'{info.get("nfe")} NFE'
    if 'network_evaluations' in info:
        text += (f', {info["network_evaluations"]} network and {info.get("gradient_evaluations", 0)} gradient '
                 'evaluations')
    return text
