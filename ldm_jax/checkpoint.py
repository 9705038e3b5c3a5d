"""Orbax checkpoints of the train state, the data-iterator position and the config, verified.

Every step holds four items: 'state', 'data' (each process's data position), 'config' and
'checksums' (each process's CRC32 of every shard it saves, from a host copy of the state taken
before the save; a state with a NaN or inf is refused there), compared after every restore. A
step that cannot be restored (a truncated or missing file, unreadable JSON) or whose arrays
differ from their checksums is reported in one line; a run resuming its own workdir moves it to
`<workdir>/checkpoints_set_aside/` (never deletes it) and takes the newest good step. Readers of
another run (sampling and a VAE run through `read_checkpoint`, `config.resume` through
`restore_newest_good(set_aside=False)`) skip it without writing. A config whose arrays differ
from the saved ones (another model or dtype) is named as such, not as corruption.

Resume order (see `train.loop`): the workdir's newest good checkpoint, then `config.resume`
(another run's checkpoint directory), then `config.init` (a diffusers folder), then from scratch.

With several processes, every process calls save and restore: each writes and reads its own
shards of the state, its own data position and its shards' checksums; process 0 writes the
config.
"""

from concurrent import futures
import dataclasses
import json
import logging
import os
import re
import time
from typing import Any
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ldm_jax import distributed
from ldm_jax import sharding

SET_ASIDE = 'checkpoints_set_aside'  # beside `checkpoints/`: steps that failed verification


class CheckpointError(RuntimeError):
  """No usable checkpoint, or a save that failed; the message says which steps and why."""


class NonFiniteStateError(ValueError):
  """A state to be saved holds NaN or inf; the message names the arrays."""


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


def _index_key(index, shape):
  """'0:64,0:320': a shard's place in its array (empty for a scalar)."""
  return ','.join(f'{s.start or 0}:{n if s.stop is None else s.stop}' for s, n in zip(index, shape))


def _crc(block):
  return zlib.crc32(np.ascontiguousarray(block).reshape(-1).view(np.uint8))


def _nonfinite(block):
  # jnp.issubdtype: numpy does not count bfloat16 as inexact.
  return jnp.issubdtype(block.dtype, jnp.inexact) and not np.isfinite(block).all()


def _pieces(x):
  """[(index, host block)] of the parts of `x` this process holds once (replica 0 of each
  shard), or the whole of a host array."""
  if isinstance(x, jax.Array):
    return [(s.index, np.asarray(s.data)) for s in x.addressable_shards if s.replica_id == 0]
  x = np.asarray(x)
  return [((slice(None),) * x.ndim, x)]


def checksums(tree):
  """({'<path>@<shard index>': crc32 of its bytes}, [paths of arrays holding NaN or inf]).

  Of the shards this process holds (each process saves its own; a shard replicated on several
  devices once). CRC32 catches every burst of up to 32 flipped bits; zlib releases the GIL, so
  the arrays are hashed on several threads.
  """
  flat = [(sharding.path_string(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]

  def one(item):
    key, x = item
    pieces = _pieces(x)
    return ({f'{key}@{_index_key(i, np.shape(x))}': _crc(b) for i, b in pieces},
            any(_nonfinite(b) for _, b in pieces))

  sums, nonfinite = {}, []
  with futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    for (key, _), (entries, bad) in zip(flat, pool.map(one, flat)):
      sums.update(entries)
      if bad:
        nonfinite.append(key)
  return sums, nonfinite


def _saved_checksums(step_dir):
  """Every process's saved checksums of a step, merged; None if the step has none."""
  folder = os.path.join(step_dir, 'checksums')
  if not os.path.isdir(folder):
    return None
  merged = {}
  for name in sorted(os.listdir(folder)):
    if name.startswith('process_') and name.endswith('.json'):
      with open(os.path.join(folder, name)) as f:
        merged.update(json.load(f))
  return merged


def verify(tree, step_dir):
  """Raises CheckpointError if `tree`, restored from `step_dir`, differs from the checksums
  saved with it or holds NaN/inf.

  Args:
    tree: the restored state, or some of its top-level entries.
    step_dir: the step's directory (its 'checksums' item). A step written before checksums
      existed is only checked for NaN/inf, with a warning.
  """
  saved = _saved_checksums(step_dir)
  by_path = {}
  for key, crc in (saved or {}).items():
    path, _, index = key.rpartition('@')
    by_path.setdefault(path, []).append((index, crc))
  differ, nonfinite, unchecked, elsewhere = [], [], [], 0
  for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    path = sharding.path_string(p)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:  # several processes
      blocks = {_index_key(i, x.shape): b for i, b in _pieces(x)}
    else:  # the saved shards, cut from the whole array (on any mesh)
      whole = np.asarray(x)
      blocks = {index: whole[tuple(slice(*map(int, d.split(':'))) for d in index.split(',') if d)]
                for index, _ in by_path.get(path, [])}
      if not blocks:
        blocks = {_index_key((slice(None),) * whole.ndim, whole.shape): whole}
    if any(_nonfinite(b) for b in blocks.values()):
      nonfinite.append(path)
    if saved is None:
      continue
    want = dict(by_path.get(path, []))
    if not want:
      unchecked.append(path)
    elif any(index in want and _crc(b) != want[index] for index, b in blocks.items()):
      differ.append(path)
    elif not any(index in want for index in blocks):
      elsewhere += 1  # several processes, another mesh: this process holds no saved shard
  if nonfinite:
    raise CheckpointError(f'NaN/inf in {_arrays(nonfinite)}')
  if saved is None:
    logging.warning('%s has no checksums (written before ldm_jax verified checkpoints): '
                    'restored unverified', step_dir)
  elif differ or unchecked:
    raise CheckpointError('corrupt: ' + '; '.join(
        [f'{_arrays(differ)} not as saved (checksum mismatch)'] * bool(differ)
        + [f'{_arrays(unchecked)} without a checksum'] * bool(unchecked)))
  elif elsewhere:
    logging.warning('%s: %d arrays restored onto another mesh over several processes could not '
                    'be verified here (their saved shards are cut differently)', step_dir,
                    elsewhere)


def _arrays(paths):
  """'2 arrays (params/a, params/b)'."""
  names = ', '.join(paths[:3]) + (', ...' if len(paths) > 3 else '')
  return f'{len(paths)} array{"s" if len(paths) != 1 else ""} ({names})'


def one_line(error):
  """A short description of why a restore or save failed: the innermost OS error if any."""
  if isinstance(error, CheckpointError):
    return str(error)
  # TensorStore's I/O errors carry the OS error in their text.
  code = re.search(r"\[os_error_code='(\d+)'\]", str(error))
  if code:
    path = re.search(r'Failed (?:writing|reading): "([^"]+)"', str(error))
    return (f'OSError: [Errno {code[1]}] {os.strerror(int(code[1]))}'
            + (f': {path[1]}' if path else ''))
  seen, e = [], error
  while e is not None and e not in seen:
    seen.append(e)
    if isinstance(e, OSError) and e.errno:
      return f'{type(e).__name__}: [Errno {e.errno}] {e.strerror}' + (
          f': {e.filename}' if e.filename else '')
    e = e.__cause__ or e.__context__
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0][:300] if text else ""}'


def _handlers(state_handler):
  """Every item's handler, so that a step's metadata reads before anything is restored."""
  return {'state': state_handler, 'data': _PerProcessJsonHandler(),
          'config': ocp.JsonCheckpointHandler(), 'checksums': _PerProcessJsonHandler()}


# Orbax writes each replicated array as slices, one per replica ("replica-parallel"), with one
# eager slicing op per leaf and device: for a small model on 2 CPU devices 1 s of every save's
# blocking part, 11% of the shapes demo's loop (bench/NOTES.md, "The training loop"). Only
# arrays whose slices are this large are split; smaller ones are written whole by replica 0.
REPLICA_PARALLEL_MIN_SLICE_BYTES = 16 << 20


def _use_array_handler():
  """Registers orbax's jax.Array handler with REPLICA_PARALLEL_MIN_SLICE_BYTES (once)."""
  handler = ocp.type_handlers.get_type_handler(jax.Array)
  if getattr(handler, '_min_slice_bytes_for_replica_parallel', None) != (
      REPLICA_PARALLEL_MIN_SLICE_BYTES):
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_SLICE_BYTES), override=True)


class Checkpointer:
  """A CheckpointManager over `<workdir>/checkpoints` (async saves, keep the newest N), verified."""

  def __init__(self, workdir, keep=3, async_save=True, directory=None):
    _use_array_handler()
    self.directory = os.path.abspath(directory or os.path.join(workdir, 'checkpoints'))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers(
        ocp.StandardCheckpointHandler()))
    self._saving = None  # the step of the newest save (its background write may be running)
    self._pending = False  # that save has not been waited for
    self._failed = None  # a failed save's message, once reported

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, data_state, config_dict):
    """Saves asynchronously after checking the state; raises CheckpointError if this or the
    previous save failed, NonFiniteStateError (nothing written) if the state has NaN/inf."""
    self.wait()  # orbax waits for the previous save anyway: its failure is named here
    sums, nonfinite = checksums(state)
    if nonfinite:
      raise NonFiniteStateError(f'the state of step {step} holds NaN/inf in '
                                f'{_arrays(nonfinite)}: not saved')
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=PerProcessJsonSave(data_state),
          config=ocp.args.JsonSave(config_dict),
          checksums=PerProcessJsonSave(sums)), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from e
    self._saving, self._pending = step, True

  def check(self):
    """Raises CheckpointError once a background save has failed (cheap: call it every step).

    Orbax's finalize thread takes the write's error as soon as the write ends: a save that is
    no longer in progress is waited for here, which raises it.
    """
    if self._pending and not self.manager.is_saving_in_progress():
      self.wait()

  def _save_error(self, step, error):
    good = [s for s in self.manager.all_steps() if s != step]
    self._failed = (f'saving step {step} to {self.directory} failed ({one_line(error)}); the run '
                    f'stopped. The checkpoints before it are intact (steps {good or "none"}): '
                    'free disk space or make the workdir writable, then run the same command '
                    'again to resume')
    return CheckpointError(self._failed)

  def restore(self, step, abstract_state):
    """(state placed like `abstract_state`'s shardings, this process's data state or None,
    config), verified against the step's checksums; raises if it cannot be restored."""
    _check_matches(self.manager.item_metadata(step)['state'], abstract_state)
    items = {'state': ocp.args.StandardRestore(abstract_state), 'data': PerProcessJsonRestore(),
             'config': ocp.args.JsonRestore()}
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    verify(out['state'], os.path.join(self.directory, str(step)))
    return out['state'], out['data'], out['config']

  def restore_newest_good(self, abstract_state, set_aside=True):
    """The newest step that restores and verifies: (step, state, data state) or None if none.

    Steps that fail are reported in one line each and, with `set_aside`, moved to
    `checkpoints_set_aside/` beside the checkpoints once a good step is found (so the run's
    next save of that step number does not meet them). If every step fails, raises
    CheckpointError listing each with why, and moves nothing.
    """
    problems = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state, data, _ = self.restore(step, abstract_state)
        problem = None
      except CheckpointError as e:  # the restored arrays failed verification (every process)
        problem = one_line(e)
      except Exception as e:  # pylint: disable=broad-except  (orbax, tensorstore, json)
        if jax.process_count() > 1:  # the others may wait in orbax's collectives: no fallback
          raise CheckpointError(
              f'checkpoint step {step} of {self.directory} cannot be read on process '
              f'{jax.process_index()} ({one_line(e)}): move it into {SET_ASIDE}/ beside it and '
              'start every process again') from e
        problem = one_line(e)
      problem = _agree(problem)
      if problem is None:
        if problems and set_aside:
          self._set_aside([s for s, _ in problems])
        return step, state, data
      logging.warning('checkpoint step %d of %s cannot be used: %s', step, self.directory,
                      problem)
      problems.append((step, problem))
    if problems:
      raise CheckpointError(
          f'no usable checkpoint in {self.directory}: '
          + '; '.join(f'step {s}: {p}' for s, p in problems)
          + '. If the config changed since they were saved (model, dtypes), run with the one '
          'they were saved with; if their files were damaged, move the checkpoints directory '
          'aside to start over')
    return None

  def _set_aside(self, steps):
    target = os.path.join(os.path.dirname(self.directory), SET_ASIDE)
    if distributed.is_main():
      os.makedirs(target, exist_ok=True)
      for step in steps:
        dest = os.path.join(target, str(step))
        if os.path.exists(dest):
          dest += f'.{time.strftime("%Y%m%d-%H%M%S")}'
        os.rename(os.path.join(self.directory, str(step)), dest)
        logging.warning('set checkpoint step %d aside to %s', step, dest)
    distributed.barrier('ldm_jax_checkpoints_set_aside')
    self.manager.reload()

  def wait(self):
    """Waits for the background save; raises CheckpointError if it failed."""
    self._pending = False
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(self._saving, e) from e

  def close(self):
    """Waits for the background save and closes; a failed save is logged, not raised (the run
    is already stopping: `wait` or `check` raise it)."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if self._failed is None:
        logging.error('%s', self._save_error(self._saving, e))
    try:
      self.manager.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.error('closing the checkpoints of %s: %s', self.directory, one_line(e))


def _check_matches(saved, abstract):
  """Raises CheckpointError if the config's arrays (`abstract`) are not the saved ones: a
  changed model or dtype, which would otherwise fail as a corrupt checkpoint."""
  flat = lambda tree: {sharding.path_string(p): x
                       for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  saved, wanted = flat(saved), flat(abstract)
  differ = [f'{k}: saved {saved[k].dtype}{list(saved[k].shape)}, config '
            f'{wanted[k].dtype}{list(wanted[k].shape)}' for k in wanted
            if k in saved and (np.dtype(saved[k].dtype) != np.dtype(wanted[k].dtype)
                               or tuple(saved[k].shape) != tuple(wanted[k].shape))]
  missing = sorted(set(wanted) ^ set(saved))
  if differ or missing:
    parts = [f'{len(differ)} arrays differ ({"; ".join(differ[:2])})'] if differ else []
    parts += [f'{len(missing)} are in one and not the other ({", ".join(missing[:2])})'] * bool(
        missing)
    raise CheckpointError('the config does not match the checkpoint: ' + ', '.join(parts))


def _agree(problem):
  """With several processes, a step is good only if it is good on every process: the first
  process's problem (or any) for all of them."""
  if jax.process_count() == 1:
    return problem
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  bad = multihost_utils.process_allgather(np.array(problem is not None))
  if not np.any(bad):
    return None
  return problem or 'failed on another process'


def latest_checkpoint_dir(path):
  """`path` if it is a checkpoints directory with a step, else `path/checkpoints`; None if none.

  Looks at the folder names only (orbax names a step's folder by its number once it is written):
  no CheckpointManager, whose creation is a collective of every process.
  """
  path = os.path.abspath(path)  # orbax wants absolute paths
  for candidate in (path, os.path.join(path, 'checkpoints')):
    if os.path.isdir(candidate) and any(
        name.isdigit() and os.path.isdir(os.path.join(candidate, name))
        for name in os.listdir(candidate)):
      return candidate
  return None


def read_checkpoint(path, item='state', step=None, only=None):
  """A checkpoint's items restored to host memory, without knowing the state's structure.

  Reads, never writes: sampling and another run's weights come through here. The state is
  verified against its checksums; without `step`, a step that fails is reported in one line and
  the next older one is read.

  Args:
    path: a workdir or its checkpoints directory.
    item: 'state', 'data' or 'config'.
    step: which step (default: the newest good one).
    only: with item 'state', the one top-level entry to restore (e.g. 'ema_params'): the others
      (the optimizer's moments, ...) are never read.

  Returns:
    (step, the restored item; with `only`, that entry alone).

  Raises:
    FileNotFoundError: no checkpoint under `path`.
    CheckpointError: none of the steps can be read (each is listed with why).
  """
  directory = latest_checkpoint_dir(path)
  if directory is None:
    raise FileNotFoundError(f'no checkpoint under {path!r}: train there first (python train.py '
                            f'--workdir {path} ...)')
  options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
  manager = ocp.CheckpointManager(directory, options=options,
                                  item_handlers=_handlers(ocp.PyTreeCheckpointHandler()))
  try:
    steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
    problems = []
    for s in steps:
      try:
        return s, _read(manager, directory, s, item, only)
      except Exception as e:  # pylint: disable=broad-except  (orbax, tensorstore, json, ours)
        if step is not None:
          raise
        problems.append((s, one_line(e)))
        logging.warning('checkpoint step %d of %s cannot be read: %s; trying the one before', s,
                        directory, problems[-1][1])
    raise CheckpointError(f'no readable checkpoint in {directory}: '
                          + '; '.join(f'step {s}: {p}' for s, p in problems))
  finally:
    manager.close()


def _read(manager, directory, step, item, only):
  """One step's item (read_checkpoint), the state verified."""
  if item != 'state':
    args = {'data': PerProcessJsonRestore(), 'config': ocp.args.JsonRestore()}[item]
    return manager.restore(step, args=ocp.args.Composite(**{item: args}))[item]
  # Onto this process's first device, whatever devices wrote it.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = {name: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                               tree)
            for name, tree in manager.item_metadata(step)['state'].items()
            if only in (None, name)}
  # A partial restore reads the entries of `target` alone (orbax's PyTree handler; the standard
  # one cannot leave entries out).
  items = {'state': ocp.args.PyTreeRestore(
      item=target, partial_restore=only is not None,
      restore_args=ocp.checkpoint_utils.construct_restore_args(target))}
  state = jax.device_get(manager.restore(step, args=ocp.args.Composite(**items))['state'])
  verify(state, os.path.join(directory, str(step)))
  return state if only is None else state[only]
