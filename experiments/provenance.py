"""What a result was measured with: the commit and the machine, for the JSON
and text files the experiments write into results/."""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import subprocess
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
# The CPU flags that decide which kernels run (oneDNN's and XLA's paths).
CPU_FLAGS = ('avx2', 'fma', 'avx512f', 'avx512_bf16', 'avx512_vnni',
             'avx_vnni', 'amx_bf16', 'amx_tile')


def machine() -> dict[str, Any]:
  """The CPU model, its kernel-relevant flags, core count and platform."""
  model, flags = '', set()
  try:
    for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name') and not model:
        model = line.split(':', 1)[1].strip()
      elif line.startswith('flags') and not flags:
        flags = set(line.split(':', 1)[1].split())
  except OSError:
    pass
  return {'cpu': model or platform.processor(),
          'cpu_flags': [f for f in CPU_FLAGS if f in flags],
          'cpu_count': os.cpu_count(), 'platform': platform.platform()}


def commit() -> str:
  """HEAD, with '-dirty' when tracked files differ from it ('' outside git)."""
  head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO,
                        capture_output=True, text=True, check=False)
  if head.returncode != 0:
    return ''
  dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'],
                         cwd=REPO, capture_output=True, text=True, check=False)
  return head.stdout.strip() + ('-dirty' if dirty.stdout.strip() else '')


def header() -> dict[str, Any]:
  """{'commit', 'date', **machine()}: the provenance of one result."""
  return {'commit': commit(), 'date': datetime.date.today().isoformat(),
          **machine()}
