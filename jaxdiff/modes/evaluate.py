"""Mode `evaluate`: FID / KID (Inception features) and / or digits FD / KID of N samples of the workdir's EMA
network, made with config.sampling (any sampler, guidance, AMED predictor), against config.evaluation's reference;
one JSON line of results printed and appended to WORKDIR/evaluation.jsonl (jaxdiff.drivers.evaluation).

    python -m jaxdiff.main --config=configs/cifar_fid.py --workdir=runs/cifar_edm --mode=evaluate
    python -m jaxdiff.main --config=configs/digits_eval.py --workdir=runs/quickstart --mode=evaluate
"""
import jax

from jaxdiff.drivers import config_check, evaluation, mesh as mesh_lib
from jaxdiff.core.errors import UserError


def run(config, workdir):
    """Evaluates the newest readable checkpoint of `workdir`; returns the result dict."""
    if not workdir:
        raise UserError('--workdir is required for --mode=evaluate (the directory holding checkpoints/)')
    config_check.check_sampling(config)
    evaluation.settings_of(config)
    mesh_lib.initialize_distributed(**config.distributed)
    result = evaluation.evaluate(config, workdir, mesh_lib.make_mesh())
    if jax.process_index() == 0:
        print(evaluation.json_line(result), flush=True)
    return result
