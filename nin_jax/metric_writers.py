"""Metrics to WORKDIR/metrics.jsonl, TensorBoard event files and the console.

Only process 0 writes; other processes get a writer that does nothing. Paths
go through `etils.epath`, so a `gs://` workdir works as well as a local one.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Mapping, Optional

import jax
from absl import logging
from etils import epath


def _to_python(value: Any) -> Any:
  if hasattr(value, 'item'):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class MetricWriter:
  """Appends `{"step", "split", ...}` lines to metrics.jsonl and TensorBoard."""

  def __init__(self, workdir: str, enabled: Optional[bool] = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._file = None
    if not self.enabled:
      return
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self._file = (workdir / 'metrics.jsonl').open('a')
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
