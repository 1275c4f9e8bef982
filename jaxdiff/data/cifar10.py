"""CIFAR-10 from tensorflow-datasets' random-access `tfds.data_source` (ArrayRecord; needs no TensorFlow).

The whole split (train: 50,000 images) is decoded once into a uint8 array [N, 32, 32, 3] (150 MB); each batch is
gathered by index and converted to float32 NHWC in [-1, 1] (x / 127.5 - 1). Labels are the classes 0..9.
The data is never downloaded here: absent data is a one-line `UserError` saying how to prepare it.
"""
import numpy as np

from jaxdiff import data
from jaxdiff.core.errors import UserError

SHAPE = (32, 32, 3)
SPLITS = ('train', 'test')
HOW_TO_GET = ('on a machine with internet run `python -c "import tensorflow_datasets as tfds; '
              "tfds.data_source('cifar10', data_dir='DIR')\"` (or `tfds build cifar10 --file_format=array_record "
              '--data_dir=DIR`), copy DIR here and pass --config.data.data_dir=DIR')


def load(data_dir=None, split='train'):
    """(images uint8 [N, 32, 32, 3], labels int32 [N]) of a prepared tfds CIFAR-10 split."""
    import tensorflow_datasets as tfds
    try:
        source = tfds.data_source('cifar10', split=split, data_dir=data_dir, download=False)
    except Exception as error:  # tfds raises several types for "not prepared" / "prepared as TFRecord"
        where = data_dir if data_dir is not None else "tfds' default data_dir (~/tensorflow_datasets)"
        cause = (str(error).strip().splitlines() or [''])[0][:160]
        raise UserError(f'CIFAR-10 ({split}) in ArrayRecord format not found in {where} '
                        f'({type(error).__name__}: {cause}); {HOW_TO_GET}') from error
    examples = list(source)  # random-access reads, decoded to numpy by tfds
    images = np.stack([example['image'] for example in examples]).astype(np.uint8)
    labels = np.asarray([example['label'] for example in examples], np.int32)
    if images.shape[1:] != SHAPE:
        raise UserError(f'CIFAR-10 in {data_dir} has images of shape {images.shape[1:]}, expected {SHAPE}')
    return images, labels


class Cifar10(data.ArraySource):
    name = 'cifar10'
    shape = SHAPE

    def __init__(self, shape=SHAPE, data_dir=None, split='train'):
        data.check_shape(self.name, shape, SHAPE)
        if split not in SPLITS:
            raise ValueError(f'data.split {split!r} is not one of {SPLITS}')
        self.images_uint8, self.labels = load(data_dir, split)
        self.num_examples = len(self.labels)
        self.split = split

    def get(self, indices):
        images = self.images_uint8[indices].astype(np.float32) / 127.5 - 1.0
        return {'image': images, 'label': self.labels[indices]}
