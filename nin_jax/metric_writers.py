"""Metrics to WORKDIR/metrics.jsonl, TensorBoard event files and the console.

Only process 0 writes; other processes get a writer that does nothing. Paths
go through `etils.epath`, so a `gs://` workdir works as well as a local one:
there metrics.jsonl is rewritten whole (`_RewrittenObject`), since a Cloud
Storage object cannot be appended to and one being written is invisible until
it is closed (a killed run would leave nothing). A resumed run first drops the
lines of the steps after its checkpoint (a killed run logged them; they are
logged again), so metrics.jsonl holds each step once.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Mapping, Optional

import jax
from absl import logging
from etils import epath

from nin_jax import cloud_storage


def _to_python(value: Any) -> Any:
  if hasattr(value, 'item'):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def _record_step(line: str) -> int:
  return int(json.loads(line)['step'])


def _read_lines(path: epath.Path) -> list[str]:
  return path.read_text().splitlines() if path.exists() else []


def _lines_up_to(lines: list[str], resume_step: Optional[int]) -> list[str]:
  """The non-empty `lines` of steps up to `resume_step` (all if None)."""
  return [l for l in lines if l and (
      resume_step is None or _record_step(l) <= resume_step)]


class _RewrittenObject:
  """A text file in a bucket: the lines already there up to `resume_step`
  (the rest are about to be logged again), then the lines written. The whole
  object is uploaded when `flush` is called and at most every `every_secs` as
  lines come (Cloud Storage takes about one write per second per object)."""

  def __init__(self, path: epath.Path, resume_step: Optional[int],
               every_secs: float = 5.0):
    self._path = path
    self._every_secs = every_secs
    self._lines = _lines_up_to(_read_lines(path), resume_step)
    self._uploaded = time.monotonic()
    self._dirty = True

  def write(self, text: str) -> None:
    self._lines.extend(text.splitlines())
    self._dirty = True
    if time.monotonic() - self._uploaded >= self._every_secs:
      self.flush()

  def flush(self) -> None:
    if self._dirty:
      self._path.write_text(''.join(l + '\n' for l in self._lines))
      self._uploaded = time.monotonic()
      self._dirty = False

  def close(self) -> None:
    self.flush()


class MetricWriter:
  """Appends `{"step", "split", ...}` lines to metrics.jsonl and TensorBoard.

  `resume_step`: the step training resumes from; lines of later steps (logged
  by a run that was killed) are dropped, so the run logs each step once.
  """

  def __init__(self, workdir: str, enabled: Optional[bool] = None,
               resume_step: Optional[int] = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._file = None
    if not self.enabled:
      return
    remote = cloud_storage.is_remote(workdir)
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / 'metrics.jsonl'
    if remote:
      self._file = _RewrittenObject(path, resume_step)
    else:
      lines = _read_lines(path) if resume_step is not None else []
      kept = _lines_up_to(lines, resume_step)
      if len(kept) < len(lines):
        staged = path.with_name('metrics.jsonl.tmp')
        staged.write_text(''.join(l + '\n' for l in kept))
        staged.replace(path)
      self._file = path.open('a')
    self._remote = remote
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(logdir=str(workdir), flush_secs=30)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('TensorBoard events disabled: %s', e)

  def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), 'split': split, 'time': round(time.time(), 3)}
    record.update({k: _to_python(v) for k, v in metrics.items()})
    self._file.write(json.dumps(record) + '\n')
    if not self._remote:  # A bucket's object is uploaded every few seconds.
      self._file.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k not in ('step', 'split', 'time') and isinstance(v, (int, float)):
          self._tb.add_scalar(f'{split}/{k}', v, int(step))

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All records of WORKDIR/metrics.jsonl, in order."""
  path = epath.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line]
