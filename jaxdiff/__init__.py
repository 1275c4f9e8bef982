"""jaxdiff: diffusion training and few-NFE sampling in JAX/Flax on one EDM-style core.

Submodules are imported on demand (`from jaxdiff import samplers, schedules, analytic, metrics, stf`),
so importing the package is cheap and the pure-math layers never pull in Flax or the data pipeline.
"""
__version__ = '0.1.0'
