"""A trained network as something to sample: the config's networks and preconditioning, and the EMA item of a
workdir's newest readable checkpoint.

    trained = restore(config, workdir, mesh)
    denoiser = trained.denoiser_fn(trained.variables, class_labels)      # a SPEC denoiser D(x, sigma)
"""
from typing import Any, Callable, NamedTuple

from jaxdiff.core import losses
from jaxdiff.drivers import checkpoint as checkpoint_lib
from jaxdiff.drivers import precision, train_step
from jaxdiff import models
from jaxdiff.models.denoiser import Denoiser


class Trained(NamedTuple):
    """denoiser_fn(variables, class_labels) -> D(x, sigma); variables: the EMA item
    {'params': {'model': ...}, 'model_state': ...}."""
    model: Any
    precond: Callable
    step: int
    variables: Any
    denoiser_fn: Callable


def denoiser_fn_for(model, precond):
    """(variables, class_labels) -> the SPEC denoiser of the EMA item `variables`."""
    def denoiser_fn(variables, class_labels=None):
        return Denoiser(model.apply, variables['params']['model'], precond, class_labels=class_labels,
                        buffers=variables['model_state'])
    return denoiser_fn


def networks_of(config):
    """(model, modules, precond): the config's networks (with its precision policy) and preconditioning."""
    model = precision.apply_to_model(models.from_config(config), precision.from_config(config))
    loss = losses.build(**config.loss)
    modules = {'model': model, **{name: models.from_config(config, section=name)
                                  for name in loss.hooks.extra_networks}}
    return model, modules, loss.parameterization.precond


def restore(config, workdir, mesh):
    """The EMA item of the newest readable checkpoint in `workdir` (no optimizer is built), as a `Trained`."""
    model, modules, precond = networks_of(config)
    step, variables = checkpoint_lib.restore_latest(workdir, train_step.abstract_ema(config, modules, mesh),
                                                    item='ema')
    return Trained(model, precond, step, variables, denoiser_fn_for(model, precond))
