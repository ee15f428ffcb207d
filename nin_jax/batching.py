"""Global batches of a split, as dicts of arrays sharded over the devices.

The training order is a pure function of (seed, step): batch `step` holds
rows of the permutation of epoch `step // steps_per_epoch`, so a resumed run
sees exactly the batches an uninterrupted one would. Each process reads only
its own rows of every global batch. A streamed split (ImageNet) is read ahead
in a background thread.

A training batch is {'image': [batch, h, w, c], 'label': [batch]}; an
evaluation batch adds 'mask' [batch], False on the padding of the last one.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import queue
import threading
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import jax
import numpy as np

from nin_jax import streaming


PREFETCH_BATCHES = 2
Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Split:
  """Images [n, height, width, channels] float32 and labels [n] int32, in
  host memory: read in the consuming thread, nothing to open or close."""
  images: np.ndarray
  labels: np.ndarray
  background = False

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.images.shape[1:])

  def open(self) -> Split:
    return self

  def read(self, indices: np.ndarray,
           keys: Optional[streaming.RowKeys] = None) -> Batch:
    """{'image', 'label'} of examples `indices` [n]; `keys` is unused
    (in-memory splits are augmented on device)."""
    del keys
    return {'image': self.images[indices], 'label': self.labels[indices]}

  def close(self) -> None:
    pass


AnySplit = Union[Split, streaming.StreamSplit]


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch (the remainder of each permutation is dropped)."""
  return max(1, num_examples // batch_size)


@functools.lru_cache(maxsize=2)
def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The example order of `epoch`: a function of (seed, epoch) alone."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_batch_indices(seed: int, step: int, batch_size: int,
                        num_examples: int) -> np.ndarray:
  """Indices [batch_size] of global training batch `step`."""
  if num_examples < batch_size:
    raise ValueError(f'a batch of {batch_size} from {num_examples} examples '
                     '(config_lib.check_batch_size refuses such configs)')
  epoch, i = divmod(step, steps_per_epoch(num_examples, batch_size))
  return epoch_permutation(seed, epoch, num_examples)[i * batch_size:
                                                       (i + 1) * batch_size]


def process_rows(global_batch: int) -> slice:
  """This process's rows of a global batch (contiguous, in process order)."""
  local = global_batch // jax.process_count()
  start = jax.process_index() * local
  return slice(start, start + local)


_END = object()


class Prefetcher:
  """Iterates `make_batch(key)` over `keys` in a background thread, up to
  `depth` batches ahead. An exception in `make_batch` is raised by `next`.
  `close()` calls `cancel` (to drop work in progress), then returns once the
  thread has ended: the thread is a daemon and never outlives the iterator."""

  def __init__(self, make_batch: Callable[[Any], Any], keys: Iterable[Any],
               cancel: Callable[[], None] = lambda: None,
               depth: int = PREFETCH_BATCHES):
    self._queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._cancel = cancel
    self._thread = threading.Thread(
        target=self._produce, args=(make_batch, iter(keys)),
        name='nin_jax_prefetch', daemon=True)
    self._thread.start()

  def _produce(self, make_batch: Callable, keys: Iterator[Any]) -> None:
    try:
      for key in keys:
        if not self._put(make_batch(key)):
          return
      self._put(_END)
    except BaseException as e:  # pylint: disable=broad-except
      self._put(e)  # Raised in the consuming thread.

  def _put(self, item: Any) -> bool:
    """Queues `item` unless closed first; False if closed."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def __iter__(self) -> Prefetcher:
    return self

  def __next__(self) -> Any:
    if self._stop.is_set():
      raise StopIteration
    item = self._queue.get()
    if item is _END or isinstance(item, BaseException):
      self.close()
      if item is _END:
        raise StopIteration
      raise item
    return item

  def close(self) -> None:
    self._stop.set()
    self._cancel()
    self._thread.join()


class Batches:
  """Global batches: this process's rows, read from `split` by `host_batch(
  reader, key)` for each key, as dicts of global arrays sharded by `sharding`.
  A streamed split is read ahead in a background thread. `close()` ends every
  thread (also before the first batch, unlike a generator's)."""

  def __init__(self, split: AnySplit, sharding: jax.sharding.Sharding,
               host_batch: Callable[[Any, Any], Batch], keys: Iterable[Any]):
    self._sharding = sharding
    self._reader = split.open()
    make = functools.partial(host_batch, self._reader)
    if split.background:
      self._host = Prefetcher(make, keys,
                              cancel=getattr(self._reader, 'cancel',
                                             lambda: None))
    else:
      self._host = map(make, keys)

  def __iter__(self) -> Batches:
    return self

  def __next__(self) -> dict[str, jax.Array]:
    try:
      batch = next(self._host)
    except BaseException:  # The end, or a read that failed: stop threads.
      self.close()
      raise
    return {k: jax.make_array_from_process_local_data(self._sharding, v)
            for k, v in batch.items()}

  def close(self) -> None:
    if isinstance(self._host, Prefetcher):
      self._host.close()
    self._reader.close()

  def __enter__(self) -> Batches:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def train_batches(split: AnySplit, seed: int, batch_size: int,
                  start_step: int, sharding: jax.sharding.Sharding) -> Batches:
  """{'image', 'label'} global batches from `start_step` on, sharded by
  `sharding`. Only this process's rows are read (gathered from host memory,
  or decoded and cropped with draws keyed by (seed, step, row))."""
  rows = np.arange(batch_size)[process_rows(batch_size)]

  def host_batch(reader, step: int) -> Batch:
    idx = train_batch_indices(seed, step, batch_size, len(split))[rows]
    return reader.read(idx, streaming.RowKeys(seed, step, rows))

  return Batches(split, sharding, host_batch, itertools.count(start_step))


def eval_batches(split: AnySplit, batch_size: int,
                 sharding: jax.sharding.Sharding) -> Batches:
  """{'image', 'label', 'mask'} batches covering every example once; the last
  batch is padded and its padding masked out (mask False). A `batch_size`
  beyond the split (rounded up to the device count) shrinks to it: the
  padding would only be masked out."""
  n = len(split)
  devices = len(sharding.device_set)
  batch_size = min(batch_size, -(-n // devices) * devices)
  rows = process_rows(batch_size)

  def host_batch(reader, start: int) -> Batch:
    idx = np.arange(start, start + batch_size)[rows]
    mask = idx < n
    return {**reader.read(np.where(mask, idx, 0), None), 'mask': mask}

  return Batches(split, sharding, host_batch, range(0, n, batch_size))
