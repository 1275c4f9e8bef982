"""Winograd F(2x2, 3x3): a stride-1 3x3 convolution as 16 matmuls (Lavin & Gray 2016, "Fast Algorithms for
Convolutional Neural Networks", eq. 8 with the F(2, 3) matrices of their section 4.1).

Per 4x4 input tile d and 3x3 filter g (cross-correlation, as every deep-learning convolution):

    Y = A^T [ (G g G^T) * (B^T d B) ] A          (2x2 output tile; * elementwise over the 4x4 transformed tile)

Summed over input channels, the elementwise product becomes, for each of the 16 transformed positions (a, b), a
matmul [tiles, C_in] x [C_in, C_out]: 16 / (4 * 9) = 2.25x fewer multiplies than the direct convolution. The
transforms use only 0, +-1 and +-1/2, so the result equals the direct convolution to float32 round-off
(tests/test_winograd.py).

Layout: each transformed position is its own array V[a][b] [B, tiles_h, tiles_w, C] (a: the tile's row, b: its
column), not one stacked [4, 4, ...] tensor: a stack is a concatenation, which XLA:CPU's fused loops evaluate
element by element with a branch per operand; 16 plain arrays are 16 vectorised loops and 16 plain dots (a faster
forward convolution at 16x16 and 32x32; benchmarks/conv_algorithms.py measures it). The kernel gradient stacks them
once for one batched matmul (faster inside the training step).

The backward pass is written out (`jax.custom_vjp`) rather than differentiated through the transforms: the input
gradient is again a Winograd convolution (of dy with the spatially flipped, in/out-transposed kernel), and the
kernel gradient is 16 matmuls in the transformed domain, dU[a][b] = V[a][b]^T dM[a][b], mapped back by G^T dU G.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

# F(2, 3) (Lavin & Gray 2016, section 4.1): B^T (input), G (filter), A^T (output).
B_T = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
A_T = ((1, 1, 1, 0), (0, 1, -1, -1))
TILE, OUT = 4, 2                 # input tile 4x4 -> output tile 2x2
MIN_CHANNELS = 16                # below this many input or output channels the transforms cost more than they save


def _combine(coefficients, terms):
    """sum_k c_k t_k over the non-zero c_k (the matrices are mostly 0 and +-1: adds and negations only)."""
    total = None
    for c, t in zip(coefficients, terms):
        if c == 0:
            continue
        term = t if c == 1 else (-t if c == -1 else t * np.asarray(c, t.dtype))
        total = term if total is None else total + term
    return total


def _outer(left, right):
    """The 2-D transform coefficients L[a] (x) R[b]: c[(i, j)] = left[a][i] * right[b][j], flattened over (i, j)."""
    return [[[l * r for l in left[a] for r in right[b]] for b in range(len(right))] for a in range(len(left))]


def input_transform(x_pad, tiles_h, tiles_w):
    """x_pad [B, 2 tiles_h + 2, 2 tiles_w + 2, C] -> V[a][b] [B, tiles_h, tiles_w, C] = (B^T d B)[a, b] per tile."""
    def element(i, j):   # element (i, j) of every 4x4 tile, the tiles OUT apart
        return x_pad[:, i:i + OUT * (tiles_h - 1) + 1:OUT, j:j + OUT * (tiles_w - 1) + 1:OUT]
    elements = [element(i, j) for i in range(TILE) for j in range(TILE)]
    return [[_combine(c, elements) for c in row] for row in _outer(B_T, B_T)]


def output_transform(M):
    """M[a][b] [B, th, tw, O] -> Y [B, 2 th, 2 tw, O] = A^T M A per tile. The 2x2 outputs of each tile are stacked
    next to their tile's axes ([B, th, 2, tw, 2, O], then a free reshape): no transpose for XLA to copy."""
    terms = [M[a][b] for a in range(TILE) for b in range(TILE)]
    y = [[_combine(c, terms) for c in row] for row in _outer(A_T, A_T)]        # y[p][q]: [B, th, tw, O]
    y = jnp.stack([jnp.stack(row, axis=3) for row in y], axis=2)                  # [B, th, 2 (p), tw, 2 (q), O]
    batch, tiles_h, _, tiles_w, _, channels = y.shape
    return y.reshape(batch, OUT * tiles_h, OUT * tiles_w, channels)


def output_transform_transpose(dy):
    """The adjoint of `output_transform`: dy [B, 2 th, 2 tw, O] -> dM[a][b] [B, th, tw, O] = (A dY A^T)[a, b]."""
    batch, height, width, channels = dy.shape
    d = dy.reshape(batch, height // OUT, OUT, width // OUT, OUT, channels)
    terms = [d[:, :, p, :, q] for p in range(OUT) for q in range(OUT)]
    A = tuple(zip(*A_T))                                                            # A [4, 2]
    return [[_combine(c, terms) for c in row] for row in _outer(A, A)]


def filter_transform(w):
    """w [3, 3, C, O] -> U[a][b] [C, O] = (G g G^T)[a, b] per (input, output) channel pair."""
    taps = [w[i, j] for i in range(3) for j in range(3)]
    return [[_combine(c, taps) for c in row] for row in _outer(G, G)]


def filter_transform_transpose(dU):
    """The adjoint of `filter_transform`: dU[a][b] [C, O] -> dw [3, 3, C, O] = G^T dU G."""
    G_T = tuple(zip(*G))
    terms = [dU[a][b] for a in range(TILE) for b in range(TILE)]
    return jnp.stack([jnp.stack([_combine(c, terms) for c in row]) for row in _outer(G_T, G_T)])


def _geometry(x, padding):
    """(x zero-padded to whole tiles, output height, output width, tiles_h, tiles_w) for a 3x3 'padding' conv."""
    _, height, width, _ = x.shape
    out_h, out_w = height + 2 * padding - 2, width + 2 * padding - 2
    tiles_h, tiles_w = -(-out_h // OUT), -(-out_w // OUT)
    x_pad = jnp.pad(x, ((0, 0), (padding, padding + OUT * tiles_h - out_h),
                        (padding, padding + OUT * tiles_w - out_w), (0, 0)))
    return x_pad, out_h, out_w, tiles_h, tiles_w


def _forward(x, w, padding):
    x_pad, out_h, out_w, tiles_h, tiles_w = _geometry(x, padding)
    V, U = input_transform(x_pad, tiles_h, tiles_w), filter_transform(w)
    M = [[jnp.einsum('nhwc,co->nhwo', V[a][b], U[a][b]) for b in range(TILE)] for a in range(TILE)]
    return output_transform(M)[:, :out_h, :out_w]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3(x, w, padding=1):
    """The cross-correlation of NHWC x with an HWIO 3x3 kernel w, stride 1, `padding` zeros on every side (0, 1 or
    2): lax.conv_general_dilated(x, w, (1, 1), [(padding, padding)] * 2, ('NHWC', 'HWIO', 'NHWC')), by Winograd."""
    return _forward(x, w, padding)


def _conv3x3_fwd(x, w, padding):
    return _forward(x, w, padding), (x, w)


def _conv3x3_bwd(padding, residuals, dy):
    x, w = residuals
    # Input gradient: a correlation of dy with the flipped kernel, its in/out channels swapped, padding 2 - p.
    dx = conv3x3(dy, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2), 2 - padding)
    # Kernel gradient in the transformed domain: dU[a][b] = V[a][b]^T dM[a][b], then dw = G^T dU G.
    x_pad, out_h, out_w, tiles_h, tiles_w = _geometry(x, padding)
    V = input_transform(x_pad, tiles_h, tiles_w)
    dy_pad = jnp.pad(dy, ((0, 0), (0, OUT * tiles_h - out_h), (0, OUT * tiles_w - out_w), (0, 0)))
    dM = output_transform_transpose(dy_pad)
    # one batched matmul over the 16 positions: 16 separate transposed-operand dots ran slower inside the training
    # step (though not alone)
    stacked = lambda T: jnp.stack([jnp.stack([t.reshape(-1, t.shape[-1]) for t in row]) for row in T])
    dU = jnp.einsum('abnc,abno->abco', stacked(V), stacked(dM))
    return dx, filter_transform_transpose(dU).astype(w.dtype)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)
