"""`--mode=summary`: the model's parameter table, ending with the line `parameters: N` (trainable count).

Shapes come from `jax.eval_shape(model.init, ...)`, so nothing is allocated or compiled: instant even for the
55M-parameter SongUNet, and no data or workdir contents are needed.
"""
import jax
import numpy as np

from jaxdiff import models


def _rows(params):
    """(module path, {param name: shape}, count) per module, sorted by path (the order of the param tree)."""
    grouped = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [str(getattr(k, 'key', k)) for k in path]
        module, param = '/'.join(keys[:-1]) or '(root)', keys[-1]
        grouped.setdefault(module, {})[param] = tuple(leaf.shape)
    return [(module, shapes, sum(int(np.prod(s)) for s in shapes.values())) for module, shapes in grouped.items()]


def format_table(params):
    """The parameter table as text: module path | parameter shapes | count, then the total line."""
    rows = [(module, ' '.join(f'{name}{list(shape)}' for name, shape in shapes.items()), f'{count:,}')
            for module, shapes, count in _rows(params)]
    header = ('module', 'parameters', 'count')
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(3)]
    line = lambda r: f'{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}'
    rule = '-' * (sum(widths) + 4)
    return '\n'.join([line(header), rule, *map(line, rows), rule, f'parameters: {models.count_params(params)}'])


def run(config, workdir=None):
    """Prints the table for `config.model` at input shape `config.data.shape`; returns the trainable count."""
    del workdir  # summary reads nothing from the workdir
    model = models.from_config(config)
    data_shape = tuple(config.data.shape)
    params = models.param_shapes(model, data_shape)
    print(f'model: {config.model.name}  input: [B, {", ".join(map(str, data_shape))}]')
    print(format_table(params))
    return models.count_params(params)
