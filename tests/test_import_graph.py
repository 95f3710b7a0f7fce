"""The package's import graph: imports go down the layers only (layers → reader → models → convert → secure → its
engines → running parties → cost/search → training → hub → cli), secure/ keeps what every engine shares below the engines' rooms and the engines apart from each
other, and no module imports itself back through others. Every import counts, those inside functions too."""
import ast
from pathlib import Path

import pytest

import timm_mpc

ROOT = Path(timm_mpc.__file__).parent

# (rank, module prefixes): a module may import its own rank or lower; the longest matching prefix decides
LAYERS = [
    (0, ['timm_mpc.utils', 'timm_mpc.timm_adapter', 'timm_mpc.version', 'timm_mpc.data', 'timm_mpc.profile']),
    (1, ['timm_mpc.layers']),
    (2, ['timm_mpc.reader', 'timm_mpc.pattern']),  # the one way to read a model, and its patterns
    (3, ['timm_mpc.models']),
    (4, ['timm_mpc.convert', 'timm_mpc.converted', 'timm_mpc.factory', 'timm_mpc.command_args']),
    (5, ['timm_mpc.secure']),  # secure/: what every engine shares (plan, settings, protocol, the forward)
    (6, ['timm_mpc.secure.crypten', 'timm_mpc.secure.spu']),  # one room per engine
    (7, ['timm_mpc.secure.__init__', 'timm_mpc.secure.launch', 'timm_mpc.secure.session', 'timm_mpc.secure.own_process',
         'timm_mpc.secure.bench', 'timm_mpc.secure.commands', 'timm_mpc.secure.serving']),  # running parties, sessions,
    # the services, the bench, the face
    (8, ['timm_mpc.cost', 'timm_mpc.search']),  # pricing from measured runs, and the search that prices patterns
    (9, ['timm_mpc.training']),
    (10, ['timm_mpc.hub']),
    (11, ['timm_mpc.cli', 'timm_mpc.__main__', 'timm_mpc.__init__']),
]
ENGINE_ROOMS = ('timm_mpc.secure.crypten', 'timm_mpc.secure.spu')


def _module_name(path: Path) -> str:
    return '.'.join(('timm_mpc',) + path.relative_to(ROOT).with_suffix('').parts)


def _modules():
    return {_module_name(p): p for p in ROOT.rglob('*.py')}


def _resolve(name: str, modules) -> str:
    """A dotted import target as the file that defines it (a package means its __init__)."""
    if name in modules:
        return name
    if f'{name}.__init__' in modules:
        return f'{name}.__init__'
    return _resolve(name.rsplit('.', 1)[0], modules)  # a name inside a module: the module


def _imports(module: str, path: Path, modules):
    package = module.rsplit('.', 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split('.')[:len(package.split('.')) - (node.level - 1)]
                target = '.'.join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ''
            if target.split('.')[0] != 'timm_mpc':
                continue
            for alias in node.names:  # `from . import ops` names a module; `from .x import y` a name in x
                full = f'{target}.{alias.name}'
                yield _resolve(full if (full in modules or f'{full}.__init__' in modules) else target, modules)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split('.')[0] == 'timm_mpc':
                    yield _resolve(alias.name, modules)


def _rank(module: str) -> int:
    best, rank = -1, None
    for r, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + '.')) and len(prefix) > best:
                best, rank = len(prefix), r
    assert rank is not None, f'{module} is in no layer of tests/test_import_graph.py: place it'
    return rank


GRAPH = {m: sorted(set(_imports(m, p, _modules())) - {m}) for m, p in _modules().items()}


def test_every_import_goes_down_the_layers():
    upward = [f'{m} (layer {_rank(m)}) imports {t} (layer {_rank(t)})'
              for m, targets in GRAPH.items() for t in targets if _rank(t) > _rank(m)]
    assert not upward, '\n'.join(upward)


def test_engines_live_apart():
    crossing = [f'{m} imports {t}' for m, targets in GRAPH.items() for t in targets
                for room in ENGINE_ROOMS if m.startswith(room) and t.startswith(ENGINE_ROOMS) and not t.startswith(room)]
    assert not crossing, '\n'.join(crossing)
    secure = ROOT / 'secure'
    assert {p.name for p in secure.iterdir() if (p / '__init__.py').is_file()} == {'crypten', 'spu', 'plan', 'serving'}


def test_no_module_imports_itself_back():
    state, cycles = {}, []

    def visit(module, stack):
        state[module] = 'open'
        for target in GRAPH.get(module, []):
            if state.get(target) == 'open':
                cycles.append(' -> '.join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[module] = 'done'

    for module in GRAPH:
        if module not in state:
            visit(module, [module])
    assert not cycles, '\n'.join(cycles)


@pytest.mark.parametrize('module', ['timm_mpc.secure.protocol', 'timm_mpc.secure.crypten.party'])
def test_the_graph_sees_what_a_module_imports(module):
    """The check reads real edges (so that the tests above cannot pass on an empty graph)."""
    assert 'timm_mpc.secure.plan.__init__' in GRAPH[module] and 'timm_mpc.secure.settings' in GRAPH[module]
