"""AMED-Solver and AMED-Plugin(iPNDM) against DPM-Solver-2, iPNDM and DPM-Solver++(3M) at NFE 3..10 on exact
denoisers (a 4x4x3 Gaussian mixture, the 16x16 digits empirical distribution; CPU, about an hour):

    python -m jaxdiff.main --mode=bench --config=configs/bench_amed.py --workdir=runs/bench_amed
    python -m jaxdiff.main --mode=bench --config=configs/bench_amed.py --workdir=runs/bench_amed_model --config.bench.problems=() --config.bench.model_config=configs/digits_amed.py

The second command benches a trained digits network instead (the workdir of configs/digits_amed.py's
amed.model_workdir unless bench.model_workdir is set): Frechet distance to held-out digits, error against a 501-NFE
Heun solve. Prints markdown tables and writes WORKDIR/bench_amed.json (see jaxdiff/bench/amed.py).
"""
import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.bench = dict(
        name='amed',
        problems=('mixture_4x4x3', 'digits'),                       # jaxdiff.bench.problems names
        problem_options={'digits': dict(shape=(16, 16, 1), split='train')},
        methods=('AMED-Solver', 'AMED-Plugin(iPNDM)'),
        nfes=(3, 4, 5, 6, 7, 8, 9, 10),
        num_trajectories=2560,       # teacher trajectories per predictor (batches of batch_size)
        batch_size=128,
        num_eval=512,                # held-out start samples scored against the reference solve
        seed=0,
        sigma_min=0.002, sigma_max=80.0,
        model_config='',             # e.g. configs/digits_amed.py: also bench that trained network
        model_workdir='',            # its checkpoint workdir (default: the config's amed.model_workdir)
        model_nfes=(5,),
        model_trajectories=256,
    )
    return config
