"""Truth benchmark of the ODE solvers on exact denoisers (CPU, a few minutes):

    python -m jaxdiff.main --config=configs/bench_solvers.py --workdir=runs/bench_solvers --mode=bench_solvers

Solver x NFE -> endpoint RMSE against a float64 reference solve and Frechet distance to exact samples, on a 2-D
mixture, a 16x16 Gaussian mixture with well-separated modes and the empirical digits distribution. Prints the tables
and writes WORKDIR/bench_solvers.csv and WORKDIR/bench_solvers.png (see jaxdiff/bench_solvers.py).
"""
import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.bench = dict(
        problems=('mixture_2d', 'gmm_16x16', 'digits'),
        solvers=('euler', 'heun', 'heun+afs', 'dpm2', 'dpm2+afs', 'dpmpp_2m', 'dpmpp_3m', 'ipndm', 'ipndm+afs'),
        nfes=(3, 4, 5, 6, 7, 8, 9, 10, 20, 35),
        num_samples={'mixture_2d': 1000, 'gmm_16x16': 500, 'digits': 500},
        seed=0,
        sigma_min=0.002, sigma_max=80.0, rho=7.0,    # EDM grid for every solver
        reference_tol=1e-8,                          # rtol = atol of the float64 adaptive reference solve
    )
    return config
