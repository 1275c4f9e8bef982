"""What the speed and memory scripts of benchmarks/ share, imported as `jaxdiff.bench.speed` (no sys.path edits):
config files with literal overrides, the training step as the loop compiles it, a median wall time, the temporary
memory of a compiled program, the CPU's model name."""
import ast
import platform
import statistics
import subprocess
import time

import jax


def cpu_name():
    """lscpu's 'Model name' (every CPU timing names its CPU), else platform.processor()."""
    try:
        out = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
        return next(line.split(':', 1)[1].strip() for line in out.splitlines() if line.startswith('Model name'))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or 'unknown CPU'


def load_config(path, overrides=()):
    """The config file with 'SECTION.FIELD=VALUE' overrides; VALUE a Python literal (1, (1, 2), 'bf16') or a
    bare string."""
    from jaxdiff.drivers import config_files
    parsed = {}
    for item in overrides:
        field, _, value = item.partition('=')
        try:
            parsed[field] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed[field] = value
    return config_files.load(path, parsed)


def train_step(config, mesh):
    """(setup, jitted step) of `config` exactly as the training loop builds them (train_step.build applies
    config.training.precision; the state is donated)."""
    from jaxdiff.drivers import train_step as train_step_lib
    setup = train_step_lib.build(config)
    return setup, train_step_lib.Jit(mesh).compile(setup.train_step)


def median_time(fn, *args, repeats):
    """Median seconds of fn(*args) (already compiled: one untimed call first), each call waited on."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def temp_bytes(compiled):
    """Temporary bytes of a compiled program (XLA's memory analysis), None where the backend gives none."""
    analysis = compiled.memory_analysis()
    return None if analysis is None else analysis.temp_size_in_bytes
