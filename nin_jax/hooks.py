"""What the training loop does around its steps: the log window (with the
non-finite and stall checks), checkpoints, SIGTERM and profiling. Each hook
is a small object the loop calls at known points (nin_jax.train)."""

from __future__ import annotations

import contextlib
import math
import signal
import time
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from nin_jax import checkpoints
from nin_jax import metric_writers
from nin_jax.errors import NonFiniteError


class PreemptionFlag:
  """Set by SIGTERM; the loop then checkpoints and returns."""

  def __init__(self):
    self.raised = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() > 1:
      return self  # JAX's preemption notifier handles SIGTERM; see `check`.
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: leave signals alone.
      self._previous = None
    return self

  def check(self, step: int) -> bool:
    """True once SIGTERM arrived; in a multi-process run, all processes agree
    on the step (JAX's preemption sync point), so none waits in a collective
    for the others."""
    if jax.process_count() > 1:
      self.raised = self.raised or multihost_utils.reached_preemption_sync_point(
          step)
    return self.raised

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class StallDetector:
  """Warns once about NiN's classic failure: the class-map ReLU dies, every
  logit is equal and the loss sits at ln(num_classes)."""

  def __init__(self, num_classes: int, patience: int = 3):
    self.flat_loss = math.log(num_classes)
    self.patience = patience
    self.count = 0
    self.warned = False

  def update(self, loss: float, logit_spread: float, step: int) -> bool:
    """Feeds one logged window: its mean loss and the batch's mean gap
    between the largest and smallest logit; True while stalled."""
    stalled = (abs(loss - self.flat_loss) < 0.01 * self.flat_loss and
               logit_spread < 0.1)
    self.count = self.count + 1 if stalled else 0
    if self.count >= self.patience and not self.warned:
      self.warned = True
      logging.warning(
          'Step %d: the loss is stuck at ln(%d) = %.4f and the logits are '
          'all but equal: the class maps carry no signal (the classic NiN '
          'stall, a dead ReLU on the class maps). '
          'Remedies: lower the last layer\'s rate '
          '(config.optim.last_layer_lr_mult=0.1), lower '
          'config.optim.learning_rate, or use config.model.weight_init='
          "'modern' with config.model.batch_norm=True.", step,
          round(math.exp(self.flat_loss)), self.flat_loss)
    return self.count >= self.patience


class TrainLog:
  """The log-window hook: keeps each step's metrics on device and fetches
  the pending ones in one transfer (at log steps, and before anything is
  evaluated or saved); writes each window's means (metrics.jsonl, TensorBoard,
  a console line with img/s and ETA counted on training time alone); stops on
  a non-finite step (or skips it) and warns about a stall.

  Each window's record has `train_seconds`: the run's training time so far
  (the first, compiling step included; evaluations and checkpoints not),
  continued from `train_seconds` of the run this one resumes."""

  def __init__(self, c: ml_collections.ConfigDict,
               writer: metric_writers.MetricWriter, steps_per_epoch: int,
               total_steps: int, num_classes: int,
               train_seconds: float = 0.0):
    self.c = c
    self.writer = writer
    self.steps_per_epoch = steps_per_epoch
    self.total_steps = total_steps
    self.stall = StallDetector(num_classes)
    self.pending = []  # (step index, metrics on device)
    self.losses, self.accuracies = [], []
    self.clock = None  # Starts once the run's first (compiling) step is done.
    self.timed_from = 0
    self.paused_seconds = 0.0
    self.train_seconds = train_seconds
    self.started = time.perf_counter()
    self.paused_in_run = 0.0

  def record(self, done: int, metrics: dict[str, jax.Array]) -> None:
    """Takes the metrics of the step that completed `done` steps."""
    self.pending.append((done - 1, metrics))
    if self.clock is None:
      jax.block_until_ready(metrics)
      self._restart_clock(done)

  def due(self, done: int) -> bool:
    return done % self.c.train.log_every_steps == 0 or done == self.total_steps

  @contextlib.contextmanager
  def paused(self):
    """Time spent inside (evaluation, checkpoints) is not training time."""
    start = time.perf_counter()
    try:
      yield
    finally:
      self.paused_seconds += time.perf_counter() - start
      self.paused_in_run += time.perf_counter() - start

  def flush(self, done: int, last_good: str) -> None:
    """Fetches the pending metrics; writes a window if `done` is a log step.
    Raises NonFiniteError at the first non-finite step (unless skipping)."""
    host = jax.device_get([m for _, m in self.pending])
    for (index, _), m in zip(self.pending, host):
      self._check(index, m, last_good)
    self.pending = []
    if self.due(done):
      if self.losses:
        self._write(done, host[-1])
      self.losses, self.accuracies = [], []
      self._restart_clock(done)

  def _restart_clock(self, done: int) -> None:
    self.clock, self.timed_from, self.paused_seconds = (
        time.perf_counter(), done, 0.0)

  def _check(self, index: int, m: dict[str, Any], last_good: str) -> None:
    if bool(m['finite']):
      self.losses.append(float(m['loss']))
      self.accuracies.append(float(m['accuracy']))
      return
    loss, norm = float(m['loss']), float(m['grad_norm'])
    reason = (f'loss {loss}, gradient norm {norm} is not finite'
              if not (math.isfinite(loss) and math.isfinite(norm)) else
              'the update overflowed the parameters, momentum or BatchNorm '
              f'statistics (loss {loss}, gradient norm {norm})')
    if not self.c.train.skip_nonfinite_steps:
      raise NonFiniteError(
          f'Step {index}: {reason}; stopped. The last good checkpoint is '
          f'{last_good}. {nonfinite_remedies(self.c.model)}')
    logging.warning('Step %d: %s; step skipped.', index, reason)

  def _write(self, done: int, m: dict[str, Any]) -> None:
    record = {'loss': float(np.mean(self.losses)),
              'accuracy': float(np.mean(self.accuracies)),
              'learning_rate': float(m['learning_rate']),
              'grad_norm': float(m['grad_norm']),
              'epoch': done / self.steps_per_epoch,
              'train_seconds': self.train_seconds + (
                  time.perf_counter() - self.started - self.paused_in_run)}
    timed = done - self.timed_from
    seconds = time.perf_counter() - self.clock - self.paused_seconds
    speed = ''
    if timed > 0 and seconds > 0:
      record['images_per_sec'] = timed * self.c.train.batch_size / seconds
      eta = (self.total_steps - done) * seconds / timed
      speed = (f' {record["images_per_sec"]:.0f} img/s ETA '
               f'{_format_eta(eta)}')
    self.writer.write(done, 'train', record)
    self.stall.update(record['loss'], float(m['logit_spread']), done)
    logging.info('step %d/%d loss %.4f acc %.4f lr %.3g%s', done,
                 self.total_steps, record['loss'], record['accuracy'],
                 record['learning_rate'], speed)


class Profiler:
  """The profiling hook: a `jax.profiler` trace of `num_steps` steps (after
  the first, compiling one) into WORKDIR/profile, for TensorBoard's profile
  plugin or Perfetto."""

  def __init__(self, workdir: str, num_steps: int, start_step: int):
    self.logdir = str(epath.Path(workdir) / 'profile')
    # Steps are numbered by the count they complete: the run's first step,
    # start_step + 1, compiles and is not traced.
    self.first = start_step + 2
    self.last = start_step + 1 + num_steps
    self.active = False
    self.enabled = num_steps > 0 and jax.process_index() == 0

  def before_step(self, done: int) -> None:
    if self.enabled and done == self.first:
      jax.profiler.start_trace(self.logdir)
      self.active = True

  def after_step(self, done: int, state: Any) -> None:
    if self.active and done == self.last:
      self.stop(state, done)

  def stop(self, state: Any, done: int) -> None:
    if self.active:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.active = False
      logging.info('Profile of steps %d-%d written to %s.', self.first, done,
                   self.logdir)


def nonfinite_remedies(m: ml_collections.ConfigDict) -> str:
  """What to change after a non-finite step, for the model of config.model
  (`m`): only the switches it does not already use."""
  fixes = ['lower config.optim.learning_rate']
  if m.weight_init != 'modern':
    fixes.append("set config.model.weight_init='modern'")
  if not m.batch_norm:
    fixes.append('set config.model.batch_norm=True')
  text = ', or '.join(fixes)
  return text[0].upper() + text[1:] + '.'


def last_good_checkpoint(last_saved: Optional[int], workdir: str) -> str:
  """The newest checkpoint a stopped run leaves, in words."""
  if last_saved is None:
    return 'none (no checkpoint was saved: the run starts over)'
  return f'step {last_saved} in {workdir}/checkpoints'


def _format_eta(seconds: float) -> str:
  seconds = int(max(0, seconds))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class CheckpointHook:
  """The checkpoint hook: saves the state at a step once (orbax, async),
  after `before_save()` (the metrics up to a checkpoint must outlive a kill
  after it)."""

  def __init__(self, manager: Any, last_saved: Optional[int],
               before_save: Callable[[], None] = lambda: None):
    self.manager = manager
    self.last_saved = last_saved
    self.before_save = before_save

  def __call__(self, step: int, state: Any) -> None:
    if self.last_saved != step:
      self.before_save()
      checkpoints.save(self.manager, step, state, force=True)
      self.last_saved = step
