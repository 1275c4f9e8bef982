"""Sampler registry: `samplers.get(name, **options)` -> `sampler(denoiser, x_T, sigmas, key=None, return_trajectory=False)`.

Every sampler returns `(x0, info)` with `info['nfe']` the denoiser calls per sample (declared),
`info['network_evaluations']` and `info['gradient_evaluations']` (counted from what each call declares, common.py)
and, when asked, `info['trajectory']` of shape [len(sigmas), B, ...] (x at every grid point, x_T first). See SPEC.md.
Every sampler also declares its cost and order (`common.Sampler`): `sampler.nfe(num_points, ends_at_zero=True)`,
`sampler.num_points_for(nfe, ends_at_zero=True)` (num_points = len(sigmas)) and `sampler.order`.

A sampler module registers factories lazily: this table maps each public name to `module:factory`, so a
missing optional dependency of one family never breaks the others. A factory takes the options as keyword
arguments and returns the sampler function.
"""
import importlib
import inspect

_REGISTRY = {
    'euler': 'ode:euler',
    'heun': 'ode:heun',
    'heun_dg': 'guided:heun_dg',
    'dpm2': 'ode:dpm2',
    'dpmpp_2m': 'multistep:dpmpp_2m',
    'dpmpp_3m': 'multistep:dpmpp_3m',
    'ipndm': 'multistep:ipndm',
    'ipndm_v': 'multistep:ipndm_v',
    'unipc': 'unipc:unipc',
    'deis': 'deis:deis',
    'euler_ancestral': 'sde:euler_ancestral',
    'dpmpp_2m_sde': 'sde:dpmpp_2m_sde',
    'ddim': 'ddim:ddim',
    'gmm_ddim': 'gmm_ddim:gmm_ddim',
    'amed': 'amed:amed',
    'adaptive': 'adaptive:adaptive',
}


def names():
    return sorted(_REGISTRY)


def factory(name):
    """The factory function registered under `name` (raises ValueError for an unknown name)."""
    if name not in _REGISTRY:
        raise ValueError(f'unknown sampler {name!r}; valid samplers: {", ".join(names())}')
    module_name, attr = _REGISTRY[name].split(':')
    module = importlib.import_module(f'{__name__}.{module_name}')
    return getattr(module, attr)


def get(name, **options):
    """Builds sampler `name` with keyword `options`; an unknown option raises ValueError listing the valid ones."""
    make = factory(name)
    valid = [p.name for p in inspect.signature(make).parameters.values() if p.kind == p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f'sampler {name!r} has no option(s) {", ".join(unknown)}; '
                         f'valid options: {", ".join(valid) or "(none)"}')
    return make(**options)
