"""Test session set-up: 8 simulated CPU devices (multi-device code paths run in-process), CPU only, and one
persistent XLA compilation cache for the whole run.

The cache directory is made once by the controlling process and handed to the xdist workers and to every
subprocess a test starts (`python -m jaxdiff.main ...`) through JAX's environment flags, so a program that several
tests, both workers or several CLI runs compile is compiled once (minimum compile time 0: every program is kept).
JAXDIFF_TEST_CACHE=DIR keeps the cache in DIR across runs instead; JAXDIFF_TEST_CACHE=off turns it off.
"""
import os
import shutil
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()

CACHE_VARIABLE = 'JAX_COMPILATION_CACHE_DIR'
_made_cache = None


def _enable_compilation_cache():
    global _made_cache
    wanted = os.environ.get('JAXDIFF_TEST_CACHE')
    if wanted == 'off':
        return
    if CACHE_VARIABLE not in os.environ:          # the controller (or a run without xdist): make the directory
        if wanted:
            os.makedirs(wanted, exist_ok=True)
        else:
            _made_cache = tempfile.mkdtemp(prefix='jaxdiff-test-xla-cache-')
        os.environ[CACHE_VARIABLE] = wanted or _made_cache
    os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
    os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'


_enable_compilation_cache()     # at import, before any test module imports jax


def pytest_unconfigure(config):
    if _made_cache and not hasattr(config, 'workerinput'):
        shutil.rmtree(_made_cache, ignore_errors=True)


# ---------------------------------------------------------------- helpers shared by several test files
# (`from conftest import NAME`; imports inside each helper keep the session set-up above free of JAX)

def sigma_of_c_noise(parameterization, c_noise, *, beta_d=19.9, beta_min=0.1, M=1000):
    """The sigma an analytic test network was given, from its c_noise input: inverts c_noise(sigma) of EDM Table 1
    (EDM: ln(sigma) / 4; VE: ln(sigma / 2); VP: (M - 1) sigma^{-1}(sigma))."""
    import jax.numpy as jnp
    from jaxdiff.core import precond
    if parameterization == 'edm':
        return jnp.exp(4 * c_noise)
    if parameterization == 've':
        return 2 * jnp.exp(c_noise)
    if parameterization == 'vp':
        return precond.vp_sigma_of_t(c_noise / (M - 1), beta_d=beta_d, beta_min=beta_min)
    raise ValueError(f'unknown parameterization {parameterization!r}; valid: edm, ve, vp')


def state_dict_from_variables(variables, model, prefix='model.'):
    """EDM's state dict (names, layouts, resampling buffers, map_noise.freqs) of a jaxdiff SongUNet's variables: the
    inverse of `jaxdiff.convert.edm.variables_from_state_dict`, to write EDM-like files for the import tests."""
    import dataclasses

    import numpy as np
    from flax import traverse_util
    from jaxdiff.convert import edm

    def to_edm_array(value):   # the inverse of edm.to_jaxdiff_array: Dense [in, out] -> [out, in], HWIO -> OIHW
        array = np.asarray(value, np.float32)
        if array.ndim == 2:
            return array.T
        if array.ndim == 4:
            return array.transpose(3, 2, 0, 1)
        return array

    out = {prefix + edm.edm_name(path): to_edm_array(value)
           for path, value in traverse_util.flatten_dict(variables['params']).items()}
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name not in ('parent', 'name')}
    out.update({prefix + name: value for name, value in edm.resample_buffers(fields).items()})
    freqs_at = edm._freqs_location({c: t for c, t in variables.items()})
    if freqs_at is not None:
        collection, path = freqs_at
        out[prefix + 'map_noise.freqs'] = np.asarray(traverse_util.flatten_dict(variables[collection])[path])
    return out
