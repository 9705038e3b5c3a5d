"""Runs the input ahead of the training step: a background thread takes the loader's next batches
and places them on the devices, `depth` batches ahead, so that the step does not wait for the host
when the host is fast enough.

Each batch carries the loader's position after it. A checkpoint saves the position of the batch
the saved state has consumed, not of the batches made ahead, so a resumed run reads on from
exactly there.
"""

import dataclasses
import queue
import threading
import time
from typing import Any, Callable

_POLL_S = 0.1  # how often a thread waiting on a full queue looks for close()


@dataclasses.dataclass
class Batch:
  """One batch of the input, ready for the step."""
  host: dict  # this host's part, numpy arrays (what the loader gave)
  placed: Any  # the global batch on the devices (what `place` made of `host`)
  position: dict  # the loader's state after this batch (JSON-serialisable)


@dataclasses.dataclass
class _Failure:
  error: BaseException


_END = object()  # the loader ran out (num_epochs)


class Prefetcher:
  """Iterates `Batch`es of `loader`, made and placed `depth` ahead in a thread (0: made in
  `next`, nothing ahead).

  Args:
    loader: an iterator of host batches with `get_state()` (data.pipeline.Loader). Not to be
      used by anyone else until `close()` returns.
    place: host batch -> arrays on the devices (sharding.put_batch on the run's mesh).
    depth: placed batches kept ready ahead of the step.

  Errors of the loader or of `place` are raised by the `next` that would have returned the batch,
  with their own traceback. `load_s` and `place_s` add up the time spent in each over the `made`
  batches (the host profile of bench/loop.py).
  """

  def __init__(self, loader, place: Callable[[dict], Any], depth: int = 2):
    self._loader, self._place, self.depth = loader, place, depth
    self.load_s = self.place_s = 0.0
    self.made = 0  # batches made (placed), ahead ones included
    self._position = loader.get_state()  # after the last batch handed out: where close() rewinds
    self._stop = threading.Event()
    self._queue = queue.Queue(maxsize=max(depth, 1))
    self._thread = None
    if depth > 0:
      self._thread = threading.Thread(target=self._work, name='ldm_jax_prefetch', daemon=True)
      self._thread.start()

  def _make(self):
    t0 = time.perf_counter()
    host = next(self._loader)
    position = self._loader.get_state()
    t1 = time.perf_counter()
    placed = self._place(host)
    self.load_s += t1 - t0
    self.place_s += time.perf_counter() - t1
    self.made += 1
    return Batch(host, placed, position)

  def _work(self):
    while not self._stop.is_set():
      try:
        item = self._make()
      except StopIteration:
        item = _END
      except BaseException as e:  # pylint: disable=broad-except
        item = _Failure(e)  # raised in the consumer's thread
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=_POLL_S)
          break
        except queue.Full:
          continue
      if item is _END or isinstance(item, _Failure):
        return

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    if self._thread is None:
      batch = self._make()
      self._position = batch.position
      return batch
    item = self._queue.get()
    if item is _END:
      self._queue.put(_END)  # every later next() ends too
      raise StopIteration
    if isinstance(item, _Failure):
      self._queue.put(item)
      raise item.error
    self._position = item.position
    return item

  def close(self):
    """Stops the thread and waits for it; the batches made ahead are dropped and the loader is
    put back after the last batch handed out, free for others (the vae stage's export measures
    its scaling factor on the next batches: the same ones with prefetch on or off)."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
      self._loader.set_state(self._position)
    while not self._queue.empty():
      self._queue.get_nowait()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
