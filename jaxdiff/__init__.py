"""jaxdiff: diffusion training and few-NFE sampling in JAX/Flax on one EDM-style core.

Layers, one folder each (a module imports only from its own folder or a lower one; tests/test_layers.py):
    core/       pure math: preconditioning, losses, STF, coupling, AOT, flow, guidance transforms, samplers,
                schedules, exact denoisers, metrics, augmentation (no Flax, no config, no I/O)
    models/     Flax Linen networks and the network-as-denoiser adapter
    data/       input pipelines (digits, CIFAR-10, synthetic)
    convert/    readers of other frameworks' files (EDM pickles, torch state dicts)
    drivers/    I/O, devices and config sections: checkpoints, train step, loop skeleton, sampling, evaluation
    bench/      benchmark tables
    modes/      one file per --mode; main.py dispatches to them

SPEC's public modules are reachable from the package itself and imported on demand
(`from jaxdiff import samplers, schedules, analytic, metrics, stf, coupling, guidance, flow`), so importing the
package is cheap and the pure-math layer never pulls in Flax or the data pipeline.
"""
import importlib

__version__ = '0.1.0'

PUBLIC = ('samplers', 'schedules', 'analytic', 'metrics', 'stf', 'coupling', 'guidance', 'flow')


def __getattr__(name):
    if name in PUBLIC:
        return importlib.import_module(f'jaxdiff.core.{name}')
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
    return sorted([*globals(), *PUBLIC])
