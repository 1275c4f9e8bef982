"""FID of a CIFAR-10 workdir trained with configs/cifar_edm.py (`--mode=evaluate`, jaxdiff.drivers.evaluation): 50,000
samples with config.sampling (EDM's Heun, 18 steps, 35 NFE), Inception-v3 pool features, FID against the TFDS
CIFAR-10 train set (statistics cached in the workdir) or EDM's reference file; one JSON line in
WORKDIR/evaluation.jsonl.

    mkdir -p ~/.cache/jaxdiff && wget -P ~/.cache/jaxdiff https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
    python -m jaxdiff.main --config=configs/cifar_fid.py --workdir=runs/cifar_edm --mode=evaluate

EDM's protocol (the minimum over 3 runs of 50k on disjoint noise) against EDM's reference statistics, with KID:

    wget -P ~/.cache/jaxdiff https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz
    python -m jaxdiff.main --config=configs/cifar_fid.py --workdir=runs/cifar_edm --mode=evaluate --config.evaluation.protocol=edm --config.evaluation.reference=$HOME/.cache/jaxdiff/cifar10-32x32.npz

(KID needs the reference features: keep reference=data for --config.evaluation.kid=True.) Any sampler:
--config.sampling.sampler=dpmpp_2m --config.sampling.schedule_options.num_steps=10, an AMED predictor:
--config.sampling.sampler=amed --config.sampling.predictor_workdir=runs/cifar_amed_nfe5. Conditional models:
`--config=configs/cifar_fid.py:cond` (random labels, as EDM's generate.py). The sampling batch is
config.sampling.batch_size (500 here).
"""
from ml_collections import config_dict

from configs import cifar_edm
from jaxdiff.drivers import evaluation as evaluation_lib

VARIANTS = ('uncond', 'cond')


def evaluation(**fields):
    """config.evaluation: the fields of jaxdiff.drivers.evaluation.FIELDS (None ones as typed placeholders, so each can be
    set from the command line)."""
    section = dict(evaluation_lib.FIELDS, inception_weights=config_dict.placeholder(str),
                   reference_split=config_dict.placeholder(str), reference_num_examples=config_dict.placeholder(int))
    unknown = sorted(set(fields) - set(section))
    if unknown:
        raise ValueError(f'cifar_fid.evaluation: no field {unknown[0]}')
    return dict(section, **fields)


def get_config(variant='uncond'):
    if variant not in VARIANTS:
        raise ValueError(f'configs/cifar_fid.py:{variant}; valid variants: {", ".join(VARIANTS)}')
    config = cifar_edm.get_config()
    config.model.label_dim = 10 if variant == 'cond' else 0
    config.sampling.num_samples = 500
    config.sampling.batch_size = 500
    config.evaluation = evaluation(num_samples=50_000, reference='data', reference_split='train')
    return config
