"""The device mesh from config, parameter shardings from regex rules, and batch placement."""

import re

import jax
import numpy as np

P = jax.sharding.PartitionSpec
BATCH_AXES = ('data', 'fsdp')  # the batch is split over every data-like axis


def make_mesh(axes, devices=None):
  """A mesh from config axes such as [('data', -1), ('fsdp', 1)] (-1: all remaining devices).

  Raises:
    ValueError: the sizes do not multiply to the device count, with the numbers.
  """
  devices = jax.devices() if devices is None else devices
  names = tuple(name for name, _ in axes)
  sizes = [size for _, size in axes]
  known = int(np.prod([s for s in sizes if s != -1]))
  if sizes.count(-1) > 1 or len(devices) % known:
    raise ValueError(f'mesh {list(axes)} does not fit {len(devices)} devices: the fixed axis sizes '
                     f'multiply to {known}')
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f'mesh {dict(zip(names, sizes))} has {int(np.prod(sizes))} devices; '
                     f'there are {len(devices)}')
  # Auto axes: XLA propagates shardings (JAX's default Explicit axes type every intermediate).
  return jax.make_mesh(tuple(sizes), names, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(names))


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
