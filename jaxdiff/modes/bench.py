"""Mode `bench`: one entry for every benchmark on exact ground truth; config.bench.name picks the table module.

    python -m jaxdiff.main --mode=bench --config=configs/bench_solvers.py --workdir=runs/bench_solvers
    python -m jaxdiff.main --mode=bench --config=configs/bench_gmm_ddim.py --workdir=runs/bench_gmm_ddim
    python -m jaxdiff.main --mode=bench --config=configs/bench_amed.py --workdir=runs/bench_amed

Each table module (jaxdiff/bench/NAME.py) has `run(config, workdir)`, imported only when chosen.
"""
import importlib

from jaxdiff.core.errors import UserError

TABLES = ('solvers', 'gmm_ddim', 'amed')


def run(config, workdir):
    bench = config.get('bench')
    name = None if bench is None else bench.get('name')
    if name not in TABLES:
        raise UserError(f'config.bench.name={name!r} names no benchmark; valid: {", ".join(TABLES)} '
                        f'(configs/bench_NAME.py set it)')
    return importlib.import_module(f'jaxdiff.bench.{name}').run(config, workdir)
