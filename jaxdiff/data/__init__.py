"""Input pipelines: one `build(config.data)` returning a source whose batches are a pure function of the step.

    source = data.build(config.data)     # config.data.name picks the set (NAMES); unknown name -> ValueError
    source.shape                          # per-example shape, e.g. (32, 32, 3), (16, 16, 1), (2,)
    source.num_examples                   # int (synthetic sets: a nominal size, every step draws fresh samples)
    batch = source.batch(step, size, *, seed, stream=0, process_index=0, process_count=1)
    batch['image']                        # float32 [size // process_count, *shape]; images NHWC in [-1, 1],
                                          # 2-D point sets unscaled
    batch['label']                        # int32 [size // process_count] (class, or mixture component; 0 if none)

    source.get(indices)                   # finite sets: the same dict for given example indices (e.g. all of
                                          # them for `analytic.Empirical` or reference statistics)
    source.mixture                        # eight_gaussians, gmm: the `analytic.GaussianMixture` (exact denoiser)

`size` is the GLOBAL batch; host `process_index` of `process_count` gets the contiguous slice
[process_index * size // process_count, (process_index + 1) * size // process_count) of the global batch, so the
hosts' slices are disjoint and their union is the 1-host batch (a run sees the same data on any number of hosts).
`size` not divisible by `process_count` is a ValueError naming both numbers.

Determinism: a batch depends only on (seed, step, stream, process_index/process_count), never on call history,
so a resumed run reads bit-identical data ("data order by step").
- Finite datasets (cifar10, digits): the example sequence is the concatenation of epoch-wise permutations of
  all indices, permutation e drawn from numpy's PCG64 seeded by (seed, stream, e); the global batch of `step` is
  positions [step * size, (step + 1) * size) of that sequence. stream = 1, 2, ... are independent index sequences
  over the same examples (e.g. STF's extra reference images use stream=1).
- Synthetic sets draw fresh samples from jax.random keyed by (seed, stream, step) for the whole global batch, then
  slice the host's rows.

Config fields (`config.data`; each feeds the argument of the same name of the set's constructor):
  name        one of NAMES
  shape       per-example shape; checked against the set (digits: (R, R, 1) resizes 8x8 to R x R; gmm: any shape)
  data_dir    cifar10: tfds data directory (None = tfds' default, ~/tensorflow_datasets)
  split       cifar10 / digits: 'train' (default) or 'test'
  radius, mode_std                     eight_gaussians (defaults 2.0, 0.1)
  noise                                two_moons (default 0.05)
  num_modes, mode_std, mixture_seed    gmm (defaults 8, 0.05, 0); see `synthetic`
  offset, variance                     two_gaussians (defaults 8.0, (3.0, 0.1)); see `synthetic`
Unknown fields are a ValueError naming the field and listing the set's fields.
Fields read by the training step, not here: `augment_p` (and any `augment_*` options of `jaxdiff.core.augment`).

The sets' modules (cifar10, digits, synthetic) use the helpers below; this package imports none of them: `build`
imports the one named, through the `module:constructor` table SETS.
"""
import importlib
import inspect

import numpy as np

SETS = {'cifar10': 'cifar10:Cifar10', 'digits': 'digits:Digits', 'eight_gaussians': 'synthetic:eight_gaussians',
        'two_moons': 'synthetic:TwoMoons', 'checkerboard': 'synthetic:Checkerboard', 'gmm': 'synthetic:gmm',
        'two_gaussians': 'synthetic:TwoGaussians'}
NAMES = tuple(SETS)
# config.data fields that belong to other parts of the pipeline (the on-device augmentation in the train step).
_FIELDS_USED_ELSEWHERE = ('name', 'augment_p')


def _constructor(name):
    module_name, attr = SETS[name].split(':')
    return getattr(importlib.import_module(f'{__name__}.{module_name}'), attr)


def build(config):
    """The source named by `config.name` (a ConfigDict or mapping); its other fields are constructor arguments."""
    fields = dict(config.items() if hasattr(config, 'items') else config)
    name = fields.get('name')
    if name not in NAMES:
        raise ValueError(f'unknown data.name {name!r}; valid names: {", ".join(NAMES)}')
    constructor = _constructor(name)
    accepted = inspect.signature(constructor).parameters
    kwargs = {}
    for field, value in fields.items():
        if field in accepted:
            kwargs[field] = value
        elif field not in _FIELDS_USED_ELSEWHERE and not field.startswith('augment_'):
            raise ValueError(f'data.{field} is not a field of data set {name!r}; its fields: '
                             f'{", ".join(sorted(accepted))}')
    return constructor(**kwargs)


def host_slice(size, process_index, process_count):
    """[start, stop) of this host's rows in a global batch of `size`."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f'process_index {process_index} must be in [0, process_count={process_count})')
    if size % process_count:
        raise ValueError(f'global batch size {size} is not divisible by the process count {process_count}')
    local = size // process_count
    return process_index * local, (process_index + 1) * local


def check_step(step):
    step = int(step)
    if step < 0:
        raise ValueError(f'step must be >= 0, got {step}')
    return step


def check_shape(name, shape, expected):
    """Raises when config.data.shape disagrees with the set; None means 'the set's own shape'."""
    if shape is not None and tuple(shape) != tuple(expected):
        raise ValueError(f'data.shape {tuple(shape)} does not match data set {name!r}, whose examples are '
                         f'{tuple(expected)}')


def epoch_permutation(num_examples, seed, stream, epoch):
    """The index order of one epoch: a permutation of range(num_examples) seeded by (seed, stream, epoch)."""
    return np.random.default_rng([seed, stream, epoch]).permutation(num_examples)


def sequence_indices(num_examples, seed, stream, start, stop):
    """Example indices at positions [start, stop) of the endless sequence of epoch permutations."""
    positions = np.arange(start, stop)
    epochs, offsets = np.divmod(positions, num_examples)
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):
        rows = epochs == epoch
        indices[rows] = epoch_permutation(num_examples, seed, stream, int(epoch))[offsets[rows]]
    return indices


class ArraySource:
    """A finite data set held in memory: subclasses set `name`, `shape` and implement `get(indices)`."""
    name = 'array'
    shape = ()
    num_examples = 0

    def get(self, indices):
        """{'image': float32 [n, *shape], 'label': int32 [n]} of the given example indices."""
        raise NotImplementedError

    def batch(self, step, size, *, seed, stream=0, process_index=0, process_count=1):
        start, stop = host_slice(size, process_index, process_count)
        first = check_step(step) * size
        return self.get(sequence_indices(self.num_examples, seed, stream, first + start, first + stop))
