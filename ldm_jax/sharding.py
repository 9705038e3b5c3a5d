"""The device mesh from config, parameter shardings from regex rules, and batch placement."""

import re

import jax
import numpy as np

P = jax.sharding.PartitionSpec
BATCH_AXES = ('data', 'fsdp')  # the batch is split over every data-like axis


def mesh_problems(axes, num_devices, axis_names=None):
  """Every problem with config mesh axes such as (('data', -1), ('fsdp', 1)) on `num_devices`.

  Args:
    axes: the config's `mesh`.
    num_devices: how many devices the run has (all hosts').
    axis_names: the axis names that mean something (BATCH_AXES and those sharding rules name),
      or None to leave the names unchecked.

  Returns:
    A list of messages, each with a mesh that fits; empty when all is well.
  """
  example = f"--config.mesh=\"(('data', -1), ('fsdp', 1))\" ({num_devices} devices, data parallel)"
  if not all(isinstance(a, (tuple, list)) and len(a) == 2 for a in axes or [None]):
    return [f'mesh {axes!r} is not a list of (axis name, size) pairs: e.g. {example}']
  names, sizes = [n for n, _ in axes], [s for _, s in axes]
  problems = []
  if len(set(names)) != len(names):
    problems.append(f'mesh {list(axes)} names an axis twice: e.g. {example}')
  unknown = [n for n in names if axis_names is not None and n not in axis_names]
  if unknown:
    problems.append(f'mesh axis {unknown[0]!r} is not one of {", ".join(axis_names)} (the '
                    f'batch axes, and any axis a sharding rule names): e.g. {example}')
  if any(not isinstance(s, int) or isinstance(s, bool) or (s < 1 and s != -1) for s in sizes):
    problems.append(f'mesh {list(axes)}: every size is a positive integer, or -1 for the devices '
                    f'left: e.g. {example}')
    return problems
  known = int(np.prod([s for s in sizes if s != -1]))
  if sizes.count(-1) > 1:
    problems.append(f'mesh {list(axes)} has more than one -1 axis: at most one axis takes the '
                    f'devices left, e.g. {example}')
  elif (num_devices % known) if -1 in sizes else known != num_devices:
    # The same axes with 'data' taking the devices left, and sizes that do not divide them at 1.
    fits = (('data', -1),) + tuple((n, s if s != -1 and num_devices % s == 0 else 1)
                                   for n, s in axes if n != 'data')
    problems.append(f'mesh {list(axes)} needs {"a multiple of " if -1 in sizes else ""}{known} '
                    f'devices; there are {num_devices}: e.g. --config.mesh="{fits}"')
  return problems


def make_mesh(axes, devices=None):
  """A mesh from config axes such as [('data', -1), ('fsdp', 1)] (-1: all remaining devices).

  Raises:
    ValueError: the sizes do not multiply to the device count, with the numbers.
  """
  devices = jax.devices() if devices is None else devices
  problems = mesh_problems(axes, len(devices))
  if problems:
    raise ValueError('; '.join(problems))
  names = tuple(name for name, _ in axes)
  known = int(np.prod([s for _, s in axes if s != -1]))
  sizes = [len(devices) // known if s == -1 else s for _, s in axes]
  # Auto axes: XLA propagates shardings (JAX's default Explicit axes type every intermediate).
  return jax.make_mesh(tuple(sizes), names, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def rule_axes(rules):
  """The mesh axis names that explicit rule specs (tuples of axis names per dimension) use."""
  named = []
  for rule in rules:
    spec = rule[1] if isinstance(rule, (tuple, list)) and len(rule) == 2 else None
    if isinstance(spec, (tuple, list)):
      for dim in spec:
        named += [dim] if isinstance(dim, str) else list(dim or ())
  return tuple(dict.fromkeys(named))


def rule_problems(rules, mesh_axes):
  """Every problem with sharding rules that shows without the parameters (regex, spec, axes).

  Args:
    rules: the config's `sharding.rules`: (regex, 'replicate' | 'fsdp' | axis names per dim).
    mesh_axes: the names of the mesh's axes.
  """
  problems = []
  for i, rule in enumerate(rules):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
      problems.append(f'sharding.rules[{i}] {rule!r} is not a (regex, spec) pair: e.g. '
                      "('.*', 'fsdp')")
      continue
    pattern, spec = rule
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      problems.append(f'sharding.rules[{i}] regex {pattern!r} does not compile: {e}')
    if isinstance(spec, str) and spec not in ('replicate', 'fsdp'):
      problems.append(f"sharding.rules[{i}] spec {spec!r} is not 'replicate' or 'fsdp' (or a "
                      "tuple of mesh axis names per dimension, such as (None, 'fsdp'))")
    missing = [a for a in rule_axes([rule]) if a not in mesh_axes]
    if missing:
      problems.append(f'sharding.rules[{i}] spec {spec!r} names axis {missing[0]!r}, which the '
                      f'mesh does not have ({", ".join(mesh_axes)})')
  return problems


def unmatched_rules(rules, *trees):
  """The sharding rules that decide no leaf of `trees`, each as a message naming the rule.

  A rule decides a leaf when it is the first rule whose regex its path matches (as in
  `tree_shardings`). One that decides none is a typo, or sits behind an earlier rule that
  matches all its paths (such as ('.*', 'fsdp')): it shards nothing.

  Args:
    rules: (regex, spec) pairs.
    *trees: the trees the rules are applied to (the abstract train state, the frozen weights).
  """
  paths = [path_string(p) for tree in trees for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
  decided = set()
  for path in paths:
    first = next((i for i, (pattern, _) in enumerate(rules) if re.search(pattern, path)), None)
    decided.add(first)
  problems = []
  for i, (pattern, spec) in enumerate(rules):
    if i in decided:
      continue
    hit = next((p for p in paths if re.search(pattern, p)), None)
    example = next((p for p in paths if p.startswith('params/')), paths[0] if paths else None)
    why = (f'every path it matches (e.g. {hit!r}) is taken by an earlier rule: put it before '
           'them' if hit else f'it matches no parameter path (they look like {example!r})')
    problems.append(f'sharding.rules[{i}] ({pattern!r}, {spec!r}) shards nothing: {why}')
  return problems


def path_string(path):
  """'unet/down_blocks_0/resnets_0/conv1/kernel' for a pytree key path."""
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return '/'.join(parts)


FSDP_MIN_SIZE = 2 ** 12  # elements: smaller arrays (biases, norms) stay replicated


def fsdp_spec(shape, fsdp_size, min_size=FSDP_MIN_SIZE):
  """Shards the largest dimension divisible by the fsdp size; small arrays stay replicated."""
  if fsdp_size == 1 or int(np.prod(shape)) < min_size:
    return P()
  dims = sorted(range(len(shape)), key=lambda d: -shape[d])
  for d in dims:
    if shape[d] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[d] = 'fsdp'
      return P(*spec)
  return P()


def tree_shardings(tree, mesh, rules):
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs) by the first matching rule.

  Args:
    tree: the pytree to place (parameters, optimizer state, the whole train state).
    mesh: the device mesh.
    rules: a list of (regex, spec) searched against each leaf's path string; spec is
      'replicate', 'fsdp' (the largest divisible dimension over the `fsdp` axis) or a tuple of
      axis names per dimension. Leaves no rule matches are replicated.

  Returns:
    A pytree of NamedSharding like `tree`.
  """
  fsdp_size = mesh.shape.get('fsdp', 1)

  def one(path, leaf):
    name, shape = path_string(path), np.shape(leaf)
    for pattern, spec in rules:
      if re.search(pattern, name):
        if spec == 'replicate' or not shape:
          return jax.sharding.NamedSharding(mesh, P())
        if spec == 'fsdp':
          return jax.sharding.NamedSharding(mesh, fsdp_spec(shape, fsdp_size))
        return jax.sharding.NamedSharding(mesh, P(*spec))
    return jax.sharding.NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh):
  axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
  return jax.sharding.NamedSharding(mesh, P(axes))


def put_batch(batch, mesh):
  """This host's part of the global batch as global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      batch)


def put_host_tree(tree, shardings):
  """Global arrays from a tree every process holds whole (the same weights on every host).

  Each process places only its own devices' shards; `jax.device_put` would also compare the
  values across hosts, a full all-gather of every weight.
  """
  def one(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

  return jax.tree.map(one, tree, shardings)


def sharded_bytes(tree):
  """(total bytes, bytes on the first device) of a tree of placed arrays or abstract leaves."""
  total = per_device = 0
  for leaf in jax.tree.leaves(tree):
    nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    total += nbytes
    sharding = getattr(leaf, 'sharding', None)
    shard = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
    per_device += int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
  return total, per_device


def check_fsdp_sharded(tree, mesh, max_replicated=0.05):
  """Fails when FSDP is on (mesh `fsdp` > 1) and large leaves that stay replicated hold more than
  `max_replicated` of `tree`'s bytes.

  Leaves under FSDP_MIN_SIZE elements (biases, norms) stay replicated by design; a large leaf
  that no rule shards, or none of whose dimensions the fsdp size divides, is what this catches.

  Returns:
    The fraction of the bytes that is sharded (1.0 without FSDP).

  Raises:
    ValueError: with the fraction and the largest replicated leaves.
  """
  if mesh.shape.get('fsdp', 1) == 1:
    return 1.0
  total, replicated = 0, []
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    total += nbytes
    if leaf.sharding.is_fully_replicated:
      replicated.append((nbytes, int(np.prod(leaf.shape)) >= FSDP_MIN_SIZE, path_string(path)))
  large = sum(n for n, big, _ in replicated if big) / max(total, 1)
  if large > max_replicated:
    names = ', '.join(f'{name} ({n / 2 ** 20:.1f} MB)'
                      for n, _, name in sorted(r for r in replicated if r[1])[-5:])
    raise ValueError(f'FSDP over {mesh.shape["fsdp"]} devices leaves {large:.1%} of the state\'s '
                     f'bytes in large replicated arrays (at most {max_replicated:.0%} allowed): '
                     f'{names}. Add sharding.rules for them or pick an fsdp size that divides '
                     'their dimensions')
  return 1 - sum(n for n, _, _ in replicated) / max(total, 1)
