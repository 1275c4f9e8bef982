"""config.loss fields of AOT (Kim et al. 2024; jaxdiff.core.aot): EDM's loss with the noise paired to the images by an
optimal-transport assignment over a pool. Every AOT recipe lists all of them, so each can be changed from the
command line (e.g. --config.loss.coupling_method=sinkhorn, --config.loss.pool_reuse=False).
"""


def loss_fields(*, pool_size, per_class=False, **fields):
    """`common.config(loss_fields=...)` of AOT: pool_size P (global, a multiple of training.batch_size) reused for
    P/B steps as the authors do; the exact assignment on the Euclidean distance between the augmented image and the
    unit noise; per_class for class-conditional models (one assignment per label, as the authors' --cond=1)."""
    return dict(dict(pairing='aot', pool_size=pool_size, pool_reuse=True, coupling_method='exact',
                     coupling_cost='euclidean', coupling_solver='scipy', coupling_epsilon=0.05, per_class=per_class),
                **fields)
