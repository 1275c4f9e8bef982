"""scikit-learn's handwritten digits (UCI optdigits test set: 1797 8x8 images, values 0..16; ships with
scikit-learn, no download), upsampled to R x R, 1 channel, float32 NHWC in [-1, 1]. Labels are the digits 0..9.

Split: scikit-learn's order, the first 1500 images are 'train', the last 297 'test' (held out for evaluation).
Resizing: bilinear interpolation with half-pixel centres and edges clamped (what PIL / `jax.image.resize`
'linear' do when upsampling), applied once as R x 8 interpolation matrices: image_R = M @ image_8 @ M^T. The
result stays in [0, 16], then x / 8 - 1 maps it to [-1, 1].
"""
import numpy as np

from jaxdiff import data

NUM_TRAIN = 1500
SPLITS = ('train', 'test')


def bilinear_matrix(size_in, size_out):
    """[size_out, size_in] weights of 1-D linear interpolation, half-pixel centres, clamped at the edges."""
    centres = (np.arange(size_out) + 0.5) * size_in / size_out - 0.5
    centres = np.clip(centres, 0, size_in - 1)
    below = np.floor(centres).astype(int)
    above = np.minimum(below + 1, size_in - 1)
    frac = centres - below
    weights = np.zeros((size_out, size_in))
    np.add.at(weights, (np.arange(size_out), below), 1 - frac)
    np.add.at(weights, (np.arange(size_out), above), frac)
    return weights


class Digits(data.ArraySource):
    name = 'digits'

    def __init__(self, shape=(16, 16, 1), split='train'):
        from sklearn.datasets import load_digits
        if shape is None:
            shape = (16, 16, 1)
        shape = tuple(shape)
        if len(shape) != 3 or shape[0] != shape[1] or shape[2] != 1 or shape[0] < 1:
            raise ValueError(f'data.shape for digits must be (R, R, 1) (square, 1 channel), got {shape}')
        if split not in SPLITS:
            raise ValueError(f'data.split {split!r} is not one of {SPLITS}')
        digits = load_digits()
        rows = slice(0, NUM_TRAIN) if split == 'train' else slice(NUM_TRAIN, None)
        resize = bilinear_matrix(8, shape[0])
        images = resize @ digits.images[rows] @ resize.T  # [N, R, R], in [0, 16]
        self.images = (images / 8.0 - 1.0).astype(np.float32)[..., None]
        self.labels = digits.target[rows].astype(np.int32)
        self.shape = shape
        self.num_examples = len(self.labels)
        self.split = split

    def get(self, indices):
        return {'image': self.images[indices], 'label': self.labels[indices]}
