"""Winograd F(2x2, 3x3): a stride-1 3x3 convolution as 16 batched matmuls (Lavin & Gray 2016, "Fast Algorithms
for Convolutional Neural Networks", eq. 8 with the F(2, 3) matrices of their section 4.1).

Per 4x4 input tile d and 3x3 filter g (cross-correlation, as every deep-learning convolution):

    Y = A^T [ (G g G^T) * (B^T d B) ] A          (2x2 output tile; * elementwise over the 4x4 transformed tile)

Summed over input channels, the elementwise product becomes, for each of the 16 transformed positions, a matmul
[tiles, C_in] x [C_in, C_out]: 16 / (4 * 9) = 2.25x fewer multiplies than the direct convolution. The transforms
use only 0, +-1 and +-1/2, so the result equals the direct convolution to float32 round-off (tests/test_winograd.py).

The backward pass is written out (`jax.custom_vjp`) rather than differentiated through the transforms: the input
gradient is again a Winograd convolution (of dy with the spatially flipped, in/out-transposed kernel), and the
kernel gradient is 16 matmuls in the transformed domain, dU = V^T dM, mapped back by G^T dU G.
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


def _tiles(x, axis, count):
    """The TILE windows along `axis`, OUT apart: TILE strided views, view r holding element r of every window."""
    return [jax.lax.slice_in_dim(x, r, r + OUT * (count - 1) + 1, stride=OUT, axis=axis) for r in range(TILE)]


def input_transform(x_pad, tiles_h, tiles_w):
    """x_pad [B, 2 tiles_h + 2, 2 tiles_w + 2, C] -> V [4 (w), 4 (h), B, tiles_h, tiles_w, C] = B^T d B per tile."""
    rows = _tiles(x_pad, 1, tiles_h)
    rows = [_combine(B_T[a], rows) for a in range(TILE)]                 # each [B, tiles_h, W_pad, C]
    out = []
    for b in range(TILE):
        out.append(jnp.stack([_combine(B_T[b], _tiles(row, 2, tiles_w)) for row in rows]))
    return jnp.stack(out)


def output_transform(M):
    """M [4 (w), 4 (h), B, tiles_h, tiles_w, O] -> Y [B, 2 tiles_h, 2 tiles_w, O] = A^T M A per tile.

    The 2x2 outputs of each tile are stacked next to their tile's axes ([B, th, 2, tw, 2, O], then a free
    reshape): built in place, with no transpose for XLA to copy."""
    cols = [_combine(A_T[q], [M[b] for b in range(TILE)]) for q in range(OUT)]         # [4 (h), B, th, tw, O]
    rows = [jnp.stack([_combine(A_T[p], [col[a] for a in range(TILE)]) for col in cols], axis=3)
            for p in range(OUT)]                                                      # [B, th, tw, 2 (w), O]
    y = jnp.stack(rows, axis=2)                                                       # [B, th, 2 (h), tw, 2, O]
    batch, tiles_h, _, tiles_w, _, channels = y.shape
    return y.reshape(batch, OUT * tiles_h, OUT * tiles_w, channels)


def output_transform_transpose(dy):
    """The adjoint of `output_transform`: dy [B, 2 th, 2 tw, O] -> dM [4 (w), 4 (h), B, th, tw, O] = A dY A^T."""
    batch, height, width, channels = dy.shape
    d = dy.reshape(batch, height // OUT, OUT, width // OUT, OUT, channels)
    d = [[d[:, :, p, :, q] for q in range(OUT)] for p in range(OUT)]               # d[p][q]: [B, th, tw, O]
    A = tuple(zip(*A_T))                                                            # A [4, 2]
    rows = [[_combine(A[a], [d[p][q] for p in range(OUT)]) for q in range(OUT)] for a in range(TILE)]
    return jnp.stack([jnp.stack([_combine(A[b], rows[a]) for a in range(TILE)]) for b in range(TILE)])


def filter_transform(w):
    """w [3, 3, C, O] -> U [4 (w), 4 (h), C, O] = G g G^T per (input, output) channel pair (elementwise sums of
    the 9 taps: a matmul with K = 3 would cost a layout transpose of U)."""
    taps = [w[i, j] for i in range(3) for j in range(3)]
    return jnp.stack([jnp.stack([_combine([G[a][i] * G[b][j] for i in range(3) for j in range(3)], taps)
                                 for a in range(TILE)]) for b in range(TILE)])


def filter_transform_transpose(dU):
    """The adjoint of `filter_transform`: dU [4 (w), 4 (h), C, O] -> dw [3, 3, C, O] = G^T dU G."""
    terms = [dU[b, a] for b in range(TILE) for a in range(TILE)]
    return jnp.stack([jnp.stack([_combine([G[a][i] * G[b][j] for b in range(TILE) for a in range(TILE)], terms)
                                 for j in range(3)]) for i in range(3)])


def _geometry(x, padding):
    """(x zero-padded to whole tiles, output height, output width, tiles_h, tiles_w) for a 3x3 'padding' conv."""
    _, height, width, _ = x.shape
    out_h, out_w = height + 2 * padding - 2, width + 2 * padding - 2
    tiles_h, tiles_w = -(-out_h // OUT), -(-out_w // OUT)
    x_pad = jnp.pad(x, ((0, 0), (padding, padding + OUT * tiles_h - out_h),
                        (padding, padding + OUT * tiles_w - out_w), (0, 0)))
    return x_pad, out_h, out_w, tiles_h, tiles_w


def _batched_matmul(V, U):
    """M[b, a] = V[b, a] U[b, a]: 16 matmuls [B * tiles, C] x [C, O]."""
    return jnp.einsum('bansc,baco->banso', V, U)


def _forward(x, w, padding):
    x_pad, out_h, out_w, tiles_h, tiles_w = _geometry(x, padding)
    V = input_transform(x_pad, tiles_h, tiles_w)
    M = _batched_matmul(V.reshape(*V.shape[:3], tiles_h * tiles_w, -1), filter_transform(w))
    return output_transform(M.reshape(*M.shape[:3], tiles_h, tiles_w, -1))[:, :out_h, :out_w]


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
    # Kernel gradient in the transformed domain: dU[b, a] = V[b, a]^T dM[b, a], then dw = G^T dU G.
    x_pad, out_h, out_w, tiles_h, tiles_w = _geometry(x, padding)
    V = input_transform(x_pad, tiles_h, tiles_w)
    dy_pad = jnp.pad(dy, ((0, 0), (0, OUT * tiles_h - out_h), (0, OUT * tiles_w - out_w), (0, 0)))
    dM = output_transform_transpose(dy_pad)
    flat = lambda t: t.reshape(*t.shape[:2], -1, t.shape[-1])
    dU = jnp.einsum('banc,bano->baco', flat(V), flat(dM))
    return dx, filter_transform_transpose(dU).astype(w.dtype)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)
