"""Truth benchmark of the ODE solvers on exact denoisers (CPU, a few minutes; with AMED rows about an hour):

    python -m jaxdiff.main --mode=bench --config=configs/bench_solvers.py --workdir=runs/bench_solvers
    python -m jaxdiff.main --mode=bench --config=configs/bench_solvers.py --workdir=runs/bench_solvers_amed --config.bench.amed_rows=True

Solver x NFE -> endpoint RMSE against a float64 reference solve and Frechet distance to exact samples, on a 2-D
mixture, a 16x16 Gaussian mixture with well-separated modes, an overlapping 4-D mixture and the empirical digits
distribution; a float64 convergence table of the two DPM-Solver++(3M) forms at 9 .. 144 steps. Prints the tables
and writes WORKDIR/bench_solvers.csv, WORKDIR/bench_solvers_convergence.csv and WORKDIR/bench_solvers.png (see
jaxdiff/bench/solvers.py).
"""
import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.bench = dict(
        name='solvers',
        problems=('mixture_2d', 'gmm_16x16', 'mixture_4d', 'digits'),   # jaxdiff.bench.problems names
        problem_options={},                                           # name -> keyword options of that problem
        solvers=('euler', 'heun', 'heun+afs', 'dpm2', 'dpm2+afs', 'dpmpp_2m', 'dpmpp_3m', 'dpmpp_3m_3rd', 'ipndm',
                 'ipndm+afs'),
        nfes=(3, 4, 5, 6, 7, 8, 9, 10, 20, 35),
        num_samples={'mixture_2d': 1000, 'gmm_16x16': 500, 'mixture_4d': 500, 'mixture_4x4x3': 500, 'digits': 500},
        seed=0,
        sigma_min=0.002, sigma_max=80.0, rho=7.0,    # EDM grid for every solver
        reference_tol=1e-8,                          # rtol = atol of the float64 adaptive reference solve
        amed_rows=False,                             # True: AMED-Solver / AMED-Plugin(iPNDM) rows at NFE 3..10
        amed=dict(num_trajectories=2560, batch_size=128, seed=0, methods=('AMED-Solver', 'AMED-Plugin(iPNDM)')),
        convergence=dict(solvers=('dpmpp_3m', 'dpmpp_3m_3rd'), steps=(9, 18, 36, 72, 144)),
    )
    return config
