"""Numerical precision of training and sampling: `config.training.precision` in {'fp32', 'tf32', 'bf16'}.

    policy = precision.get(config.training.precision)
    model = precision.apply_to_model(model, policy)          # the network computes in policy.compute_dtype
    step = precision.with_matmul_precision(step, policy)     # convs / matmuls traced at policy.matmul_precision

  fp32  float32 compute, every conv / matmul at Precision.HIGHEST (no TF32 or bf16 passes on GPU / TPU;
        EDM's published setting, `torch.backends.cuda.matmul.allow_tf32 = False`)
  tf32  float32 compute, convs / matmuls at 'tensorfloat32' (Precision.HIGH: TF32 tensor cores on Ampere+ GPUs,
        3 bf16 passes on TPU)
  bf16  the network's activations, convs and matmuls in bfloat16 (mixed precision, Micikevicius et al. 2018);
        parameters, Adam state and EMA stay float32 (the network casts its float32 weights to bf16 per use,
        models/layers.py); GroupNorm statistics, attention logits/softmax, the network output, the
        preconditioning (precond.py) and the loss stay float32. bf16 has float32's exponent range, so no loss
        scaling is needed (unlike fp16).

On CPU every policy computes float32 convs / matmuls the same way (XLA:CPU ignores the precision flag); bf16 there
changes the dtype of activations only.
"""
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class Policy(NamedTuple):
    name: str
    compute_dtype: Any          # dtype of the network's activations and conv / matmul operands
    matmul_precision: str       # jax.default_matmul_precision value for float32 convs / matmuls


POLICIES = {
    'fp32': Policy('fp32', jnp.float32, 'highest'),
    'tf32': Policy('tf32', jnp.float32, 'tensorfloat32'),
    # bf16 operands ignore the precision flag; the few float32 matmuls left (attention logits) use the
    # platform's fastest float32 mode.
    'bf16': Policy('bf16', jnp.bfloat16, 'default'),
}


def get(name):
    """The policy named by config.training.precision; an unknown name is a ValueError naming the field."""
    if isinstance(name, Policy):
        return name
    if name not in POLICIES:
        raise ValueError(f'config.training.precision={name!r}; valid: {", ".join(POLICIES)}')
    return POLICIES[name]


def from_config(config):
    """The policy of `config.training.precision` ('fp32' when the config predates the field)."""
    return get(config.training.get('precision', 'fp32'))


def apply_to_model(model, policy):
    """`model` computing in policy.compute_dtype (its `dtype` field; parameters stay float32).

    A network without a `dtype` field can only run fp32 / tf32; asking it for bf16 is a ValueError."""
    policy = get(policy)
    if not hasattr(model, 'dtype'):
        if jnp.dtype(policy.compute_dtype) != jnp.float32:
            raise ValueError(f'config.training.precision={policy.name!r} needs a model with a `dtype` field; '
                             f'{type(model).__name__} has none')
        return model
    return model.clone(dtype=policy.compute_dtype)


def with_matmul_precision(fn, policy):
    """`fn` whose convs / matmuls are traced under `jax.default_matmul_precision(policy.matmul_precision)`.

    JAX resolves a conv's / dot's default precision when it is traced, so wrapping the function that jit traces
    fixes the precision of the compiled step whatever context the caller runs in."""
    policy = get(policy)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.default_matmul_precision(policy.matmul_precision):
            return fn(*args, **kwargs)
    return wrapped
