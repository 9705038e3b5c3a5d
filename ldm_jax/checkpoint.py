"""Orbax checkpoints of the train state, the data-iterator position and the config.

Resume order (see `train.loop`): the workdir's latest checkpoint, then `config.resume` (another
run's checkpoint directory), then `config.init` (a diffusers folder), then from scratch.
"""

import os

import jax
import orbax.checkpoint as ocp

_ITEMS = ('state', 'data', 'config')


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
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config_dict)), force=True)

  def restore(self, step, abstract_state):
    """(state placed like `abstract_state`'s shardings, data state, config dict)."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
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


def read_checkpoint(path, item='state', step=None):
  """A checkpoint's items restored to host memory, without knowing the state's structure.

  Args:
    path: a workdir or its checkpoints directory.
    item: 'state', 'data' or 'config'.
    step: which step (default: the latest).

  Returns:
    (step, the restored item).
  """
  directory = latest_checkpoint_dir(path)
  if directory is None:
    raise FileNotFoundError(f'no checkpoint under {path!r}: train there first (python train.py '
                            f'--workdir {path} ...)')
  manager = ocp.CheckpointManager(directory, item_names=_ITEMS)
  step = manager.latest_step() if step is None else step
  args = {'state': ocp.args.StandardRestore(), 'data': ocp.args.JsonRestore(),
          'config': ocp.args.JsonRestore()}[item]
  restored = manager.restore(step, args=ocp.args.Composite(**{item: args}))[item]
  manager.close()
  if item == 'state':
    restored = jax.tree.map(lambda x: jax.device_get(x), restored)
  return step, restored
