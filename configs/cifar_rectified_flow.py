"""The rectified-flow baseline of Fast-ODE on CIFAR-10: configs/cifar_fastode.py with independent noise (the authors'
`--independent`: z ~ N(0, I), no encoder, no KL); everything else (55.7M DDPM++, lr 2e-4, batch 128, 500k steps,
5k warm-up, EMA 0.9999, flips, uniform-t sampling grid) is the same recipe.

    python -m jaxdiff.main --config=configs/cifar_rectified_flow.py --workdir=runs/cifar_rectified_flow

The encoder section stays in the config (unused: only the 'fastode' pairing builds it), so
--config.loss.pairing=fastode turns this into configs/cifar_fastode.py.
"""
from configs import cifar_fastode


def get_config():
    return cifar_fastode.get_config(pairing='independent')
