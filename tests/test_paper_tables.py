"""experiments/paper_tables.py: the rows each table builds (no training),
its one-line errors, and two tiny tables trained for real on the quick-start
config: `dropout` (2 runs of 10 steps, the command line as a user runs it,
made once for both test tiers) and, slow, `heads` in a copy of its workdir
(its GAP row is dropout's run with dropout, reused: 2 runs). Reruns happen
in this process with the launching of runs replaced by a failure, so
"nothing trained" is what they check."""

import contextlib
import hashlib
import io
import json
import math
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from experiments import paper_table_defs
from experiments import paper_table_report
from experiments import paper_tables
from helpers import shared_run
from nin_jax import config_lib
from nin_jax import metric_writers

REPO = pathlib.Path(__file__).resolve().parents[1]

QUICKSTART = 'configs/quickstart.py'
STEPS = 10  # Evaluations every 2 steps: 5 a run, not one a step.


def run_script(*args, env=None):
  """Runs `python -m experiments.paper_tables ARGS` from the repository
  root; the completed process."""
  env = dict(os.environ if env is None else env, JAX_PLATFORMS='cpu')
  return subprocess.run(
      [sys.executable, '-m', 'experiments.paper_tables', *args],
      capture_output=True, text=True, timeout=300, cwd=REPO, env=env)


def run_in_process(monkeypatch, *args, launch=None):
  """paper_tables.main(ARGS) here; its stdout. Each run it would launch goes
  to `launch(row)` (which returns run_row's (status, seconds, last line));
  without `launch`, launching any fails the test."""

  def no_launch(row):
    pytest.fail(f'launched a training: {shlex.join(row.command())}')

  monkeypatch.setattr(paper_tables, 'run_row', launch or no_launch)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    paper_tables.main(list(args))
  return out.getvalue()


def fingerprint(workdir):
  """Hashes of every file under `workdir` but the table's own outputs (the
  metrics, checkpoints and configs of its rows)."""
  root = pathlib.Path(workdir)
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob('*')) if p.is_file()
          and p.parent != root}


def run_dropout_table(directory):
  """The dropout table on the quick-start config, as a user runs it, into
  `directory`; its stdout and stderr kept beside the table's files."""
  result = run_script('--table=dropout', f'--base={QUICKSTART}',
                      f'--steps={STEPS}', f'--workdir={directory}')
  (directory / 'stdout.txt').write_text(result.stdout)
  (directory / 'stderr.txt').write_text(result.stderr)
  assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope='module')
def dropout():
  """The dropout table trained once for both test tiers (helpers.shared_run):
  (workdir, its stderr, the .json it wrote). Tests only read it or copy it."""
  workdir = shared_run('paper_tables_dropout', run_dropout_table)
  return (workdir, (workdir / 'stderr.txt').read_text(),
          json.loads((workdir / 'dropout.json').read_text()))


def copy_of(workdir, tmp_path):
  """A copy of a table's workdir (links between its rows kept as links)."""
  copy = tmp_path / 'tables'
  shutil.copytree(workdir, copy, symlinks=True)
  return copy


@pytest.fixture(scope='module')
def heads(dropout, tmp_path_factory):
  """The heads table on the quick-start config in a copy of the dropout
  table's workdir, run in this process: (workdir, its stdout, the .json it
  wrote, the rows it launched). Its GAP row is the config of
  dropout/dropout."""
  workdir = copy_of(dropout[0], tmp_path_factory.mktemp('heads'))
  launched = []
  real_run_row = paper_tables.run_row

  def launch(row):
    launched.append(row.variant.key)
    return real_run_row(row)

  with pytest.MonkeyPatch.context() as monkeypatch:
    stdout = run_in_process(monkeypatch, '--table=heads',
                            f'--base={QUICKSTART}', f'--steps={STEPS}',
                            f'--workdir={workdir}', launch=launch)
  return (workdir, stdout, json.loads((workdir / 'heads.json').read_text()),
          launched)


def assert_finished_rows(table, workdir, name, keys, fields):
  """Each row of `table` finished its STEPS steps, its command is the
  launcher's with the row's `fields`, and its error is its own evaluation at
  the final step."""
  assert table['table'] == name and table['error_unit'] == 'percent'
  assert table['base'] == QUICKSTART
  assert table['budget'] == {'steps': STEPS, 'epochs': None}
  for row, key, row_fields in zip(table['rows'], keys, fields, strict=True):
    assert math.isfinite(row['error']) and 0 <= row['error'] <= 100
    assert row['steps'] == STEPS
    assert row['epochs'] == pytest.approx(STEPS / 22)  # 22 steps an epoch.
    assert row['wall_seconds'] > 0 and row['not_run'] is None
    argv = shlex.split(row['command'])
    assert argv[:4] == ['python', '-m', 'nin_jax.main',
                        f'--config={QUICKSTART}']
    assert f'--workdir={workdir / name / key}' in argv
    for field in row_fields:
      assert field in argv, (field, argv)
    assert f'--config.train.num_train_steps={STEPS}' in argv
    evaluations = [r for r in metric_writers.read_metrics(row['workdir'])
                   if r['split'] == 'test']
    assert [r['step'] for r in evaluations] == [2, 4, 6, 8, 10]
    assert row['error'] == pytest.approx(100 * evaluations[-1]['error'])


def assert_markdown_and_png(workdir, name, table):
  """TABLE.md puts the paper's error beside ours with the command; TABLE.png
  opens."""
  lines = (workdir / f'{name}.md').read_text().splitlines()
  body = [l for l in lines if l.startswith('| ')
          and not l.startswith(('| variant', '| ---'))]
  assert len(body) == len(table['rows'])
  for line, row in zip(body, table['rows']):
    cells = [c.strip() for c in line.strip('|').split(' | ')]
    assert cells[0] == row['variant']
    paper = row['paper_error']
    assert cells[1] == ('figure only' if paper is None else f'{paper:.2f}')
    note = f' ({row["note"]})' if row['note'] else ''
    assert cells[2] == f'{row["error"]:.2f}{note}'
    assert cells[3] == str(STEPS)
    assert cells[6] == f'`{row["command"]}`'
  with Image.open(workdir / f'{name}.png') as image:
    image.verify()
    assert image.size[0] > 300 and image.size[1] > 200


def test_dropout_json_has_two_finished_rows(dropout):
  workdir, stderr, table = dropout
  assert stderr.count('Training quickstart') == 2
  assert [r['variant'] for r in table['rows']] == ['dropout 0.5',
                                                    'no dropout']
  assert [r['paper_error'] for r in table['rows']] == [10.41, None]
  assert_finished_rows(table, workdir, 'dropout', ('dropout', 'no_dropout'),
                       (['--config.model.dropout_rate=0.5'],
                        ['--config.model.dropout_rate=0.0']))
  assert_markdown_and_png(workdir, 'dropout', table)


def test_rerun_trains_nothing(dropout, monkeypatch, tmp_path):
  workdir = copy_of(dropout[0], tmp_path)
  table = dropout[2]
  before = fingerprint(workdir)
  stdout = run_in_process(monkeypatch, '--table=dropout',
                          f'--base={QUICKSTART}', f'--steps={STEPS}',
                          f'--workdir={workdir}')
  assert stdout.count('finished before, not run again') == 2
  assert fingerprint(workdir) == before  # Metrics, checkpoints unchanged.
  again = json.loads((workdir / 'dropout.json').read_text())
  assert [r['error'] for r in again['rows']] == [
      r['error'] for r in table['rows']]
  assert [r['wall_seconds'] for r in again['rows']] == [
      r['wall_seconds'] for r in table['rows']]


def test_row_without_final_evaluation_is_unfinished(dropout, tmp_path):
  """A row is finished by its evaluation at the final step alone: without it
  (a run killed before), the row is run again and resumes."""
  workdir, _, _ = dropout
  rows = paper_tables.build_rows(
      paper_table_defs.TABLES['dropout'], QUICKSTART, STEPS, None, None, [],
      str(workdir))
  assert all(paper_tables.read_result(row) for row in rows)
  metrics = metric_writers.read_metrics(rows[0].workdir)
  short = [r for r in metrics if not (r['split'] == 'test'
                                      and r['step'] == STEPS)]
  copy = tmp_path / 'metrics_only'
  copy.mkdir()
  (copy / 'metrics.jsonl').write_text(
      ''.join(json.dumps(r) + '\n' for r in short))
  rows[0].workdir = str(copy)
  assert not paper_tables.read_result(rows[0])


def test_dropout_rows_differ_only_in_dropout_rate(dropout):
  workdir, _, table = dropout
  with_dropout, without = table['rows']
  a, b = (shlex.split(r['command']) for r in table['rows'])
  assert len(a) == len(b)
  differ = [(x, y) for x, y in zip(a, b) if x != y]
  assert differ == [
      (f'--workdir={workdir / "dropout" / "dropout"}',
       f'--workdir={workdir / "dropout" / "no_dropout"}'),
      ('--config.model.dropout_rate=0.5', '--config.model.dropout_rate=0.0')]
  for row in table['rows']:
    saved = json.loads(
        (pathlib.Path(row['workdir']) / 'config.json').read_text())
    assert saved['model']['dropout_rate'] == (
        0.5 if row is with_dropout else 0.0)


@pytest.mark.slow
def test_heads_json_has_three_finished_rows(heads):
  workdir, _, table, _ = heads
  assert [r['variant'] for r in table['rows']] == [
      'GAP', 'fully connected', 'fully connected + dropout']
  assert [r['paper_error'] for r in table['rows']] == [10.41, 11.59, 10.88]
  assert_finished_rows(
      table, workdir, 'heads', ('gap', 'fc', 'fc_dropout'),
      [[f'--config.model.head={head}',
        f'--config.model.head_dropout_rate={rate}']
       for head, rate in (('gap', '0.0'), ('fc', '0.0'), ('fc', '0.5'))])
  assert_markdown_and_png(workdir, 'heads', table)


@pytest.mark.slow
def test_same_run_in_another_table_is_reused_not_trained(heads, dropout,
                                                        monkeypatch):
  """heads/gap trains the config of dropout/dropout: with that row finished
  in the same workdir, it links to it and only the two other heads train."""
  _, _, dropout_table = dropout
  workdir, stdout, table, launched = heads
  assert ('heads/gap: not run again: the run of dropout/dropout, the same '
          'config') in stdout
  assert launched == ['fc', 'fc_dropout']
  linked = workdir / 'heads' / 'gap'
  assert linked.is_symlink() and linked.resolve() == (
      workdir / 'dropout' / 'dropout')
  reused, *trained = table['rows']
  source = dropout_table['rows'][0]
  assert reused['error'] == source['error'] and reused['steps'] == STEPS
  assert reused['wall_seconds'] == source['wall_seconds']
  assert reused['note'] == 'the run of dropout/dropout, the same config'
  assert all(r['note'] is None and r['error'] is not None for r in trained)
  assert 'the run of dropout/dropout, the same config' in (
      workdir / 'heads.md').read_text()
  again = run_in_process(monkeypatch, '--table=heads', f'--base={QUICKSTART}',
                         f'--steps={STEPS}', f'--workdir={workdir}')
  assert again.count('finished before, not run again') == 3
  assert json.loads((workdir / 'heads.json').read_text()) == table


def test_dataset_without_data_is_not_run_with_one_line(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != paper_tables.DATA_ENV}
  empty = tmp_path / 'no_tfds'
  empty.mkdir()
  result = run_script('--table=cifar100', f'--workdir={tmp_path}',
                      f'--config.data.data_dir={empty}', env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [l for l in result.stdout.splitlines() if 'not run' in l]
  assert len(lines) == 1
  assert 'tfds:cifar100' in lines[0] and '--data=DIR with cifar100.npz' in (
      lines[0])
  assert not (tmp_path / 'cifar100' / 'cifar100').exists()  # Not launched.
  table = json.loads((tmp_path / 'cifar100.json').read_text())
  (row,) = table['rows']
  assert row['error'] is None and row['paper_error'] == 35.68
  assert 'tfds:cifar100 is not available' in row['not_run']
  markdown = (tmp_path / 'cifar100.md').read_text()
  assert '| NIN + dropout | 35.68 | not run: tfds:cifar100' in markdown
  assert not (tmp_path / 'cifar100.png').exists()


def overrides(rows):
  return [row.overrides for row in rows]


@pytest.fixture
def data_dir(tmp_path):
  """A --data folder with (empty) cifar10.npz, mnist/mnist.npz and svhn.npz:
  building rows only checks that the files exist."""
  (tmp_path / 'mnist').mkdir()
  for name in ('cifar10.npz', 'mnist/mnist.npz', 'svhn.npz'):
    (tmp_path / name).write_bytes(b'')
  return tmp_path


def test_heads_rows_vary_only_the_head_on_the_authors_model(data_dir):
  rows = paper_tables.build_rows(paper_table_defs.TABLES['heads'], None, 50,
                                 None, str(data_dir), [], '/w')
  assert [r.config for r in rows] == ['configs/cifar10.py:faithful'] * 3
  budget = {'train.num_train_steps': 50, 'train.eval_every_steps': 10,
            'train.checkpoint_every_steps': 10}
  data = {'data.dataset': f'npz:{data_dir / "cifar10.npz"}'}
  lr = {'optim.learning_rate': 0.05}  # Half the author's: 0.1 stalls here.
  assert overrides(rows) == [
      {**lr, 'model.head': 'gap', 'model.head_dropout_rate': 0.0, **budget,
       **data},
      {**lr, 'model.head': 'fc', 'model.head_dropout_rate': 0.0, **budget,
       **data},
      {**lr, 'model.head': 'fc', 'model.head_dropout_rate': 0.5, **budget,
       **data}]
  assert [r.workdir for r in rows] == ['/w/heads/gap', '/w/heads/fc',
                                       '/w/heads/fc_dropout']
  # Each head is the same as configs/cifar10.py's variant of that name, on
  # the faithful model.
  for row, variant in zip(rows, ('gap', 'fc', 'fc_dropout')):
    ours = paper_tables.row_config(row)
    theirs = config_lib.load_config_file(str(REPO / 'configs' / 'cifar10.py'),
                                         variant)
    assert ours.model.head == theirs.model.head
    assert ours.model.head_dropout_rate == theirs.model.head_dropout_rate
    assert ours.model.weight_init == 'faithful' and not ours.model.batch_norm
    assert ours.optim.learning_rate == 0.05
  # A --base gets only what the table varies: its own learning rate stays.
  (gap, *_) = paper_tables.build_rows(paper_table_defs.TABLES['heads'],
                                      'configs/cifar10.py', 50, None,
                                      str(data_dir), [], '/w')
  assert 'optim.learning_rate' not in gap.overrides
  # The .md, .json and .png name the config with what the table sets on it.
  tables = paper_table_defs.TABLES
  assert paper_table_report.config_text(tables['heads'], None) == (
      'configs/cifar10.py:faithful, optim.learning_rate=0.05')
  assert paper_table_report.config_text(tables['heads'], QUICKSTART) == QUICKSTART
  assert paper_table_report.config_text(tables['cifar10'], None) is None


def test_dropout_rows_and_epochs_budget(data_dir):
  rows = paper_tables.build_rows(paper_table_defs.TABLES['dropout'], QUICKSTART,
                                 None, 2.5, str(data_dir), [], '/w')
  assert [r.config for r in rows] == [QUICKSTART] * 2
  assert overrides(rows) == [
      {'model.dropout_rate': 0.5, 'train.num_epochs': 2.5},
      {'model.dropout_rate': 0.0, 'train.num_epochs': 2.5}]


def test_dataset_tables_use_their_configs_or_the_base(data_dir):
  rows = paper_tables.build_rows(paper_table_defs.TABLES['cifar10'], None, None,
                                 None, str(data_dir), [], '/w')
  assert [r.config for r in rows] == ['configs/cifar10.py',
                                      'configs/cifar10_aug.py']
  npz = {'data.dataset': f'npz:{data_dir / "cifar10.npz"}'}
  assert overrides(rows) == [npz, npz]  # Their own lengths, their own fields.
  rows = paper_tables.build_rows(paper_table_defs.TABLES['cifar10'], QUICKSTART,
                                 None, None, str(data_dir), [], '/w')
  assert [r.config for r in rows] == [QUICKSTART] * 2
  assert overrides(rows) == [{'data.augment': False}, {'data.augment': True}]
  (mnist,) = paper_tables.build_rows(paper_table_defs.TABLES['mnist'], None, 7,
                                     None, str(data_dir), [], '/w')
  assert mnist.config == 'configs/mnist.py' and mnist.skip is None
  assert mnist.overrides['data.dataset'] == (
      f'npz:{data_dir / "mnist" / "mnist.npz"}')
  assert mnist.overrides['train.eval_every_steps'] == 1
  (svhn,) = paper_tables.build_rows(paper_table_defs.TABLES['svhn'], None, None,
                                    None, str(data_dir), [], '/w')
  assert svhn.overrides == {'data.dataset': f'npz:{data_dir / "svhn.npz"}',
                            'data.use_extra_split': False}
  assert 'no extra split' in svhn.note


def test_extra_overrides_reach_every_row(data_dir):
  rows = paper_tables.build_rows(
      paper_table_defs.TABLES['heads'], QUICKSTART, None, None, None,
      [('train.seed', '3'), ('optim.learning_rate', '0.05')], '/w')
  for row in rows:
    assert row.command()[-2:] == ['--config.train.seed=3',
                                  '--config.optim.learning_rate=0.05']
    config = paper_tables.row_config(row)
    assert config.train.seed == 3 and config.optim.learning_rate == 0.05


def test_final_step_of_a_run_in_epochs(quickstart_config):
  quickstart_config.train.num_epochs = 2.5
  assert paper_tables.final_step(quickstart_config, []) is None
  logged = [{'split': 'train', 'step': 20, 'epoch': 20 / 22}]
  assert paper_tables.final_step(quickstart_config, logged) == 55
  quickstart_config.train.num_train_steps = 30
  assert paper_tables.final_step(quickstart_config, []) == 30


@pytest.mark.parametrize('args, message', [
    (['--table=tables'], "argument --table: invalid choice: 'tables'"),
    (['--table=heads', '--steps=5', '--epochs=1'],
     'argument --epochs: not allowed with argument --steps'),
    (['--table=heads', '--steps=0'], 'argument --steps: must be positive'),
    (['--table=heads', '--epochs=-2'], 'argument --epochs: must be positive'),
    (['--table=heads', '--base=configs/missing.py'],
     '--base=configs/missing.py: the config does not load'),
    (['--table=heads', '--base=configs/cifar10.py:nope'],
     '--base=configs/cifar10.py:nope: the config does not load'),
    (['--table=heads', f'--base={REPO / QUICKSTART}', '--config.train.sed=1'],
     "--config.train.sed=1: the config has no field 'train.sed'"),
    (['--table=heads', '--verbose'], "unrecognized argument '--verbose'"),
])
def test_mistakes_are_one_line_and_status_2(args, message, tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    paper_tables.main([*args, f'--workdir={tmp_path}'])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('paper_tables: error: ')
  assert message in err
  assert not list(tmp_path.iterdir())  # Nothing written.
