"""Orbax checkpoints of the train state, the data-iterator position and the config.

Resume order (see `train.loop`): the workdir's latest checkpoint, then `config.resume` (another
run's checkpoint directory), then `config.init` (a diffusers folder), then from scratch.

With several processes, every process calls save and restore: each writes and reads its own
shards of the state and its own data position; process 0 writes the config.
"""

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

_ITEMS = ('state', 'data', 'config')


def _process_file():
  return f'process_{jax.process_index()}-of-{jax.process_count()}.json'


class _PerProcessJsonHandler(ocp.CheckpointHandler):
  """One JSON file per process (`process_<i>-of-<n>.json`): every host's own data position."""

  def save(self, directory, args):
    (directory / _process_file()).write_text(json.dumps(args.item))

  def restore(self, directory, args=None):
    """This process's item; None when the checkpoint was written by another number of processes."""
    del args
    path = directory / _process_file()
    legacy = directory / 'metadata'  # one process, before per-process files (orbax JsonSave)
    if not path.exists() and jax.process_count() == 1 and legacy.exists():
      path = legacy
    if not path.exists():
      logging.warning('%s holds no data position for process %d of %d (written by another number '
                      'of processes?): the data starts over', directory, jax.process_index(),
                      jax.process_count())
      return None
    return json.loads(path.read_text())

  def metadata(self, directory):
    del directory

  def finalize(self, directory):
    del directory

  def close(self):
    pass


@ocp.args.register_with_handler(_PerProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class PerProcessJsonSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(_PerProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class PerProcessJsonRestore(ocp.args.CheckpointArgs):
  pass


class Checkpointer:
  """A CheckpointManager over `<workdir>/checkpoints` (async saves, keep the newest N)."""

  def __init__(self, workdir, keep=3, async_save=True, directory=None):
    self.directory = os.path.abspath(directory or os.path.join(workdir, 'checkpoints'))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, data_state, config_dict):
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=PerProcessJsonSave(data_state),
        config=ocp.args.JsonSave(config_dict)), force=True)

  def restore(self, step, abstract_state):
    """(state placed like `abstract_state`'s shardings, this process's data state or None, config)."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=PerProcessJsonRestore(),
        config=ocp.args.JsonRestore()))
    return out['state'], out['data'], out['config']

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def latest_checkpoint_dir(path):
  """`path` if it is a checkpoints directory with a step, else `path/checkpoints`; None if none."""
  path = os.path.abspath(path)  # orbax wants absolute paths
  for candidate in (path, os.path.join(path, 'checkpoints')):
    if os.path.isdir(candidate) and ocp.CheckpointManager(candidate).latest_step() is not None:
      return candidate
  return None


def read_checkpoint(path, item='state', step=None, only=None):
  """A checkpoint's items restored to host memory, without knowing the state's structure.

  Reads, never writes: sampling and another run's weights come through here.

  Args:
    path: a workdir or its checkpoints directory.
    item: 'state', 'data' or 'config'.
    step: which step (default: the latest).
    only: with item 'state', the one top-level entry to restore (e.g. 'ema_params'): the others
      (the optimizer's moments, ...) are never read.

  Returns:
    (step, the restored item; with `only`, that entry alone).
  """
  directory = latest_checkpoint_dir(path)
  if directory is None:
    raise FileNotFoundError(f'no checkpoint under {path!r}: train there first (python train.py '
                            f'--workdir {path} ...)')
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                  item_handlers={
      'state': ocp.PyTreeCheckpointHandler(), 'data': _PerProcessJsonHandler(),
      'config': ocp.JsonCheckpointHandler()})
  step = manager.latest_step() if step is None else step
  if item == 'state':  # onto this process's first device, whatever devices wrote it
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {name: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                 tree)
              for name, tree in manager.item_metadata(step)['state'].items()
              if only in (None, name)}
    # A partial restore reads the entries of `target` alone (orbax's PyTree handler; the
    # standard one cannot leave entries out).
    args = ocp.args.PyTreeRestore(item=target, partial_restore=only is not None,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(target))
  else:
    args = {'data': PerProcessJsonRestore(), 'config': ocp.args.JsonRestore()}[item]
  restored = manager.restore(step, args=ocp.args.Composite(**{item: args}))[item]
  manager.close()
  if item == 'state':
    restored = jax.device_get(restored)
    if only is not None:
      restored = restored[only]
  return step, restored
