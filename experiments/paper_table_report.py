"""A rerun paper table as its reader sees it: the Markdown table, the JSON
summary (with provenance) and the figure of test error against epoch."""

from __future__ import annotations

import shlex
from typing import Any, Optional

from experiments import common
from experiments import provenance
from experiments.paper_table_defs import Row, Table


def config_text(table: Table, base: Optional[str]) -> Optional[str]:
  """The config every row runs: --base, or the table's own with the fields it
  sets on it ('configs/cifar10.py:faithful, optim.learning_rate=0.05'); None
  when each row runs its own."""
  if base is not None or table.base is None:
    return base
  return ', '.join([table.base] + [f'{field}={common.flag_value(value)}'
                                   for field, value in table.base_fields])



def budget_text(steps: Optional[int], epochs: Optional[float]) -> str:
  if steps is not None:
    return f'{steps} steps per row'
  if epochs is not None:
    return f'{epochs:g} epochs per row'
  return "the configs' own lengths (the paper's full runs)"



def _seconds_text(seconds: Optional[float]) -> str:
  if seconds is None:
    return ''
  return f'{seconds:.0f} s' if seconds < 120 else f'{seconds / 60:.1f} min'



def _cell(text: str) -> str:
  return text.replace('|', '\\|')



def markdown(table: Table, rows: list[Row], base: Optional[str],
             budget: str) -> str:
  """The table: variant, the paper's test error, ours, length, wall time and
  the command (run from the repository root)."""
  lines = [
      f'# {table.name}: {table.description}', '',
      f'Config: {config_text(table, base) or "each row its own"}; '
      f'budget: {budget}. '
      'Test error in percent; the paper\'s from Lin, Chen & Yan, Network In '
      'Network (ICLR 2014). Commands run from the repository root.', '',
      "| variant | paper's test error (%) | ours (%) | steps | epochs | "
      'wall time | command |',
      '| --- | --- | --- | --- | --- | --- | --- |']
  for row in rows:
    paper = ('figure only' if row.variant.paper_error is None
             else f'{row.variant.paper_error:.2f}')
    if row.error is not None and row.skip is None:
      ours = f'{row.error:.2f}'
    elif row.skip is not None:
      ours = f'not run: {row.skip}'
    else:
      ours = 'not finished'
    if row.note:
      ours += f' ({row.note})'
    lines.append('| ' + ' | '.join(_cell(c) for c in (
        row.variant.name, paper, ours,
        '' if row.steps is None else str(row.steps),
        '' if row.epochs is None else f'{row.epochs:.2f}',
        _seconds_text(row.wall_seconds),
        f'`{shlex.join(row.command())}`')) + ' |')
  return '\n'.join(lines) + '\n'



def summary(table: Table, rows: list[Row], base: Optional[str],
            steps: Optional[int], epochs: Optional[float]) -> dict[str, Any]:
  """The .json: every row, errors in percent (`error` null if not run)."""
  return {
      'table': table.name,
      'description': table.description,
      'base': config_text(table, base),
      'budget': {'steps': steps, 'epochs': epochs},
      'error_unit': 'percent',
      'rows': [{
          'variant': row.variant.name,
          'paper_error': row.variant.paper_error,
          'error': None if row.skip is not None else row.error,
          'steps': row.steps,
          'epochs': row.epochs,
          'wall_seconds': row.wall_seconds,
          'command': shlex.join(row.command()),
          'workdir': row.workdir,
          'not_run': row.skip,
          'note': row.note,
      } for row in rows],
      **provenance.header()}



def plot(table: Table, rows: list[Row], config: str, budget: str,
         out: str) -> bool:
  """Test error against epoch, one line per row that evaluated (the paper's
  number dashed in the same colour); False if none did."""
  import matplotlib  # The 'plot' extra: imported only when plotting.
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from experiments import plot_curves  # Reads metrics.jsonl.
  from nin_jax import inference
  runs = []
  for row in rows:
    try:
      run = plot_curves.read_run(row.workdir)
    except (inference.WorkdirError, OSError):
      continue
    if run.eval['epoch'].size:
      runs.append((row, run))
  if not runs:
    return False
  fig, ax = plt.subplots(figsize=(8, 5), layout='constrained')
  for row, run in runs:
    line, = ax.plot(run.eval['epoch'], 100 * run.eval['error'], marker='.',
                    label=row.variant.name)
    if row.variant.paper_error is not None:
      ax.axhline(row.variant.paper_error, color=line.get_color(),
                 linestyle='--', linewidth=1,
                 label=f'{row.variant.name}: paper')
  ax.set_xlabel('epoch')
  ax.set_ylabel(f'{runs[0][1].eval_split} error (%)')
  ax.set_title(f'{table.name} ({config}): {budget}')
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=9)
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return True
