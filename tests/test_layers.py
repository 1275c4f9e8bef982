"""The package's layering (ARCHITECTURE.md), read from the import statements of every module: the pure-math layer
imports no framework and no higher jaxdiff layer, samplers import no models, nothing outside modes/ imports modes/,
and the training loop names no method."""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'jaxdiff')
PURE = ('precond', 'losses', 'stf', 'coupling', 'aot', 'flow', 'guidance', 'schedules', 'analytic', 'metrics',
        'augment', 'samplers', 'errors')
FRAMEWORKS = ('flax', 'optax', 'orbax', 'ml_collections', 'tensorflow_datasets', 'tensorflow', 'torch')
ALLOWED = ('optax.assignment',)   # a pure-JAX algorithm (the Hungarian method), no optimizer
METHOD_NAMES = ('stf', 'aot', 'fastode', 'fast-ode', 'fast_ode', 'amed', 'gmm_ddim', 'guidance', 'discriminator',
                'reference', 'encoder', 'coupling', 'sinkhorn')
LOOP_FILES = ('jaxdiff/modes/train.py', 'jaxdiff/train_step.py')


def modules():
    """{dotted module name: set of imported dotted names} for every .py file of the package."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith('.py'):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
            dotted = rel[:-len('.__init__')] if rel.endswith('.__init__') else rel
            tree = ast.parse(open(path).read(), path)
            imported = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    imported.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module:
                    base = node.module
                    if node.level:   # relative import: resolve against the package of this module
                        parts = dotted.split('.')[:-node.level if name != '__init__.py' else len(dotted)]
                        base = '.'.join(parts + [node.module])
                    imported.update(f'{base}.{alias.name}' for alias in node.names)
            found[dotted] = imported
    return found


def layer_of(dotted):
    parts = dotted.split('.')
    return parts[1] if len(parts) > 1 else ''


def test_pure_math_imports_no_framework_and_no_higher_layer():
    problems = []
    for module, imported in modules().items():
        if layer_of(module) not in PURE:
            continue
        for name in imported:
            top = name.split('.')[0]
            if top in FRAMEWORKS and not name.startswith(ALLOWED):
                problems.append(f'{module} imports {name}')
            if top == 'jaxdiff' and name != 'jaxdiff' and layer_of(name) not in PURE:
                problems.append(f'{module} imports {name} (a higher layer)')
    assert not problems, problems


def test_samplers_import_no_models_and_nothing_imports_modes():
    problems = []
    for module, imported in modules().items():
        for name in imported:
            if layer_of(module) == 'samplers' and name.startswith('jaxdiff.models'):
                problems.append(f'{module} imports {name}')
            if name.startswith('jaxdiff.modes') and layer_of(module) != 'modes':
                problems.append(f'{module} imports {name}')
    assert not problems, problems


def test_the_checker_sees_imports():
    """The parser finds what it is looking for (guards the tests above against passing vacuously)."""
    found = modules()
    assert 'jaxdiff.train_step' in found['jaxdiff.modes.train']   # `from jaxdiff import train_step as ...`
    assert any(name.startswith('jaxdiff.precond') for name in found['jaxdiff.losses'])
    assert any(name.startswith('flax') for name in found['jaxdiff.models.mlp'])


def test_the_training_loop_names_no_method():
    for path in LOOP_FILES:
        text = open(os.path.join(ROOT, path)).read().lower()
        named = [name for name in METHOD_NAMES if re.search(rf'\b{re.escape(name)}\b', text)]
        assert not named, f'{path} names {named}'
