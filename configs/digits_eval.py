"""Evaluate the quickstart digits model (configs/quickstart.py) with the digits metric (`--mode=evaluate`,
jaxdiff.drivers.evaluation): digits FD / KID of 1,500 samples (the training set's size) in the features of a small digits
classifier trained by jaxdiff in seconds (jaxdiff.drivers.digits_metric); one JSON line in WORKDIR/evaluation.jsonl.

    python -m jaxdiff.main --config=configs/quickstart.py --workdir=runs/quickstart
    python -m jaxdiff.main --config=configs/digits_eval.py --workdir=runs/quickstart --mode=evaluate

Other samplers: --config.sampling.sampler=ipndm --config.sampling.schedule_options.num_steps=5 (5 NFE); an AMED
predictor (configs/digits_amed.py): --config.sampling.sampler=amed --config.sampling.predictor_workdir=runs/digits_amed_nfe5.
Inception FID as well (weights: configs/cifar_fid.py): --config.evaluation.metric=both.
"""
from configs import cifar_fid, quickstart


def get_config():
    config = quickstart.get_config()
    config.sampling.batch_size = 500
    config.evaluation = cifar_fid.evaluation(num_samples=1500, metric='digits', kid=True, feature_batch_size=100,
                                             reference='data', reference_split='train')
    return config
