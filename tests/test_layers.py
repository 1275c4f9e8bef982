"""The package's layering (ARCHITECTURE.md), read from the import statements of every module (function-local ones
included): a module imports only from its own folder or a lower layer, the pure-math layer imports no framework,
nothing imports modes/, there is no import cycle, and the training loop and the sampling drivers name no method."""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'jaxdiff')
# A folder's rank: it may import its own rank and lower ones.
RANK = {'core': 0, 'models': 1, 'data': 1, 'convert': 2, 'drivers': 3, 'bench': 4, 'modes': 5, 'main': 6}
FRAMEWORKS = ('flax', 'optax', 'orbax', 'ml_collections', 'tensorflow_datasets', 'tensorflow', 'torch')
ALLOWED = ('optax.assignment',)   # a pure-JAX algorithm (the Hungarian method), no optimizer
METHOD_NAMES = ('stf', 'aot', 'fastode', 'fast-ode', 'fast_ode', 'amed', 'gmm_ddim', 'guidance', 'discriminator',
                'reference', 'encoder', 'coupling', 'sinkhorn', 'cfg', 'autoguidance', 'heun_dg', 'predictor')
# files that run training or sampling for every method and so must name none
METHOD_BLIND = ('jaxdiff/modes/train.py', 'jaxdiff/drivers/train_step.py', 'jaxdiff/drivers/generate.py',
                'jaxdiff/drivers/loop.py', 'jaxdiff/core/samplers/common.py')


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
                    assert not node.level, f'{dotted}: relative import'
                    imported.update(f'{node.module}.{alias.name}' for alias in node.names)
            found[dotted] = imported
    return found


def layer_of(dotted):
    parts = dotted.split('.')
    return parts[1] if len(parts) > 1 else ''


def module_of(name, known):
    """The package module an imported name refers to (`jaxdiff.core.losses.per_example` -> jaxdiff.core.losses)."""
    while name not in known and '.' in name:
        name = name.rsplit('.', 1)[0]
    return name if name in known else None


def test_every_module_sits_in_a_layer_folder():
    loose = [m for m in modules() if layer_of(m) not in RANK and m != 'jaxdiff']
    assert not loose, f'modules outside the layer folders: {loose}'


def test_imports_point_down():
    problems = []
    for module, imported in modules().items():
        if module == 'jaxdiff':
            continue
        for name in imported:
            if name.startswith('jaxdiff.') and RANK[layer_of(name)] > RANK[layer_of(module)]:
                problems.append(f'{module} imports {name} (a higher layer)')
    assert not problems, problems


def test_pure_math_imports_no_framework():
    problems = [f'{module} imports {name}' for module, imported in modules().items() if layer_of(module) == 'core'
                for name in imported if name.split('.')[0] in FRAMEWORKS and not name.startswith(ALLOWED)]
    assert not problems, problems


def test_nothing_imports_modes():
    problems = [f'{module} imports {name}' for module, imported in modules().items()
                if layer_of(module) not in ('modes', 'main') for name in imported if name.startswith('jaxdiff.modes')]
    assert not problems, problems


def test_no_import_cycle():
    """Depth-first search over the module graph; importing a.b.c also runs the packages a.b and a."""
    found = modules()
    graph = {}
    for module, imported in found.items():
        edges = set()
        for name in imported:
            target = module_of(name, found)
            while target and target != 'jaxdiff':
                if target != module:   # a module's own package counts: its __init__ runs first
                    edges.add(target)
                target = target.rsplit('.', 1)[0]
        graph[module] = edges
    state, cycles = {}, []

    def visit(node, path):
        state[node] = 'open'
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 'open':
                cycles.append(' -> '.join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 'done'

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_the_checker_sees_imports_and_cycles():
    """The parser finds what it is looking for (guards the tests above against passing vacuously)."""
    found = modules()
    assert 'jaxdiff.drivers.train_step' in found['jaxdiff.modes.train']   # `from jaxdiff.drivers import train_step`
    assert any(name.startswith('jaxdiff.core.precond') for name in found['jaxdiff.core.losses'])
    assert any(name.startswith('flax') for name in found['jaxdiff.models.mlp'])
    assert module_of('jaxdiff.core.losses.per_example', found) == 'jaxdiff.core.losses'


def test_method_blind_files_name_no_method():
    for path in METHOD_BLIND:
        text = open(os.path.join(ROOT, path)).read().lower()
        named = [name for name in METHOD_NAMES if re.search(rf'\b{re.escape(name)}\b', text)]
        assert not named, f'{path} names {named}'
