"""Benchmark GMM-DDIM (Gabbur, arXiv 2311.04938) against DDIM on exact ground truth (CPU, a few minutes):

    python -m jaxdiff.main --mode=bench --config=configs/bench_gmm_ddim.py --workdir=runs/bench_gmm_ddim

Two truth problems (jaxdiff.bench.problems): a 5-mode Gaussian mixture of 8x8x3 images with unequal weights and the
empirical distribution of scikit-learn's digits (8x8x1, the 1500 training images; a mode = the digit class of the
nearest training image). DDPM's discrete alpha-bar grid, steps x eta x method x seed; metrics: Frechet distance and
sliced Wasserstein-2 to exact samples, total-variation error of the per-mode sample fractions. Writes
WORKDIR/bench_gmm_ddim.csv, WORKDIR/bench_gmm_ddim.png and prints the tables (mean +- std over seeds); see
jaxdiff/bench/gmm_ddim.py.
"""
import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    # the GMM-DDIM options shared by every variant (samplers.get('gmm_ddim', ...) keyword arguments)
    config.gmm_ddim = dict(num_components=8, scale=1.0, delta_form='shared', covariance='diagonal',
                           vub_coordinates='largest', last_step_offsets=False)
    config.bench = dict(
        name='gmm_ddim',
        problems=('separated_mixture', 'digits'),
        # keyword options of each problem (bench.problems.get); 16x16x3 works too for the mixture, but its
        # 768-dim sqrtm per FD makes the run ~5x longer
        problem_options={'separated_mixture': dict(shape=(8, 8, 3), weights=(0.35, 0.25, 0.2, 0.12, 0.08),
                                                   std=0.2, seed=0),
                         'digits': dict(shape=(8, 8, 1), split='train')},
        methods=('ddim', 'rand', 'ortho', 'ortho_vub', 'vub_star'),   # 'ddim' or a gmm_ddim variant
        steps=(5, 10, 20, 50),
        etas=(0.0, 0.2, 0.5, 1.0),
        schedule='ddpm',
        num_seeds=3,
        num_samples=1000,            # generated samples per seed (and per exact reference set)
        num_projections=256,         # sliced Wasserstein directions
        seed=0,
    )
    return config
