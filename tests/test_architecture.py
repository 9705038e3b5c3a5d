"""The house rules of the tree, checked from the source: no import cycle in ldm_jax (function-level
imports count), sampling never imports training, no function over 60 lines, thin entry points."""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / 'ldm_jax'


def _module_name(path):
  parts = list(path.relative_to(ROOT).with_suffix('').parts)
  if parts[-1] == '__init__':
    parts.pop()
  return '.'.join(parts)


def _modules():
  """{module name: path} for every module of ldm_jax."""
  return {_module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))}


def _imports(path, modules):
  """The ldm_jax modules a file imports anywhere in it (module level or inside functions).

  `from pkg import sub` counts as importing `pkg.sub` when that is a module, else `pkg`; a
  module's own parent packages are left out (Python has already started them).
  """
  me = _module_name(path) if path.is_relative_to(PACKAGE) else ''
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      for a in node.names:
        found.add(f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in modules
                  else node.module)
  return {m for m in found if m in modules and not (me + '.').startswith(m + '.')}


def _graph():
  modules = _modules()
  return {name: _imports(path, modules) for name, path in modules.items()}


def _reachable(graph, start):
  seen, todo = set(), list(start)
  while todo:
    m = todo.pop()
    if m not in seen:
      seen.add(m)
      todo += graph.get(m, ())
  return seen


def test_no_import_cycle_in_ldm_jax():
  graph = _graph()
  assert len(graph) > 40
  cycles = sorted(m for m in graph if m in _reachable(graph, graph[m]))
  assert not cycles, f'modules on an import cycle: {cycles}'


def test_sampling_imports_nothing_from_training():
  graph, modules = _graph(), _modules()
  for start in ['ldm_jax.sampling'] + [m for m in graph if m.startswith('ldm_jax.sampling.')]:
    bad = sorted(m for m in _reachable(graph, graph[start]) if m.startswith('ldm_jax.train'))
    assert not bad, f'{start} imports (through others) {bad}'
  entry = _imports(ROOT / 'sample.py', modules)
  assert entry, 'sample.py imports nothing from ldm_jax?'
  bad = sorted(m for m in _reachable(graph, entry) if m.startswith('ldm_jax.train'))
  assert not bad, f'sample.py imports (through others) {bad}'


def test_no_function_over_60_lines():
  long = []
  for path in PACKAGE.rglob('*.py'):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > 60:
          long.append(f'{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)')
  assert not long, long


@pytest.mark.parametrize('script', ['train.py', 'sample.py'])
def test_entry_points_are_thin(script):
  assert len((ROOT / script).read_text().splitlines()) < 150


def _function(path, name, inside=None):
  """The ast node of function `name` (nested in function `inside`, if given)."""
  tree = ast.parse((ROOT / path).read_text())
  for node in ast.walk(tree):
    if isinstance(node, ast.FunctionDef) and node.name == (inside or name):
      if inside is None:
        return node
      return next(n for n in ast.walk(node) if isinstance(n, ast.FunctionDef) and n.name == name)
  raise AssertionError(f'{name} not found in {path}')


@pytest.mark.parametrize('stage', ['ldm', 'vae', 'clip'])
def test_the_jitted_update_and_its_loss_fit_one_screen(stage):
  lines = lambda n: n.end_lineno - n.lineno + 1
  update = _function('ldm_jax/train/step.py', 'update', inside='make_update_fn')
  gradients = _function('ldm_jax/train/step.py', 'gradients', inside='make_update_fn')
  loss = _function(f'ldm_jax/train/stages/{stage}.py', 'loss')
  assert lines(update) + lines(gradients) + lines(loss) < 60


def test_the_loop_never_branches_on_a_stage_name():
  for path in ('ldm_jax/train/loop.py', 'ldm_jax/train/export.py', 'ldm_jax/train/step.py'):
    assert not re.search(r'\.name\b|\.stage\s*(==|!=|in\b)', (ROOT / path).read_text()), path


# The README's layers, bottom to top: a module imports only from its own layer or below.
LAYERS = [
    ('ldm_jax.models', 'ldm_jax.tokenizer', 'ldm_jax.sharding', 'ldm_jax.distributed',
     'ldm_jax.watchdog', 'ldm_jax.cli_logging', 'ldm_jax.config_check'),
    ('ldm_jax.convert', 'ldm_jax.data', 'ldm_jax.checkpoint', 'ldm_jax.diffusion'),
    ('ldm_jax.weights', 'ldm_jax.evaluation'),
    ('ldm_jax.sampling',),
    ('ldm_jax.train',),
]


def _layer(module):
  if module == 'ldm_jax':
    return 0
  if module.endswith('.__main__'):  # `python -m` commands: entry points (as train.py), not imported
    return len(LAYERS)
  for level, prefixes in enumerate(LAYERS):
    if any(module == p or module.startswith(p + '.') for p in prefixes):
      return level
  raise AssertionError(f'{module} is in no layer: add it to LAYERS and the README')


def test_imports_never_go_up_a_layer():
  upward = [f'{m} -> {d}' for m, deps in _graph().items() for d in deps
            if _layer(d) > _layer(m)]
  assert not upward, upward
