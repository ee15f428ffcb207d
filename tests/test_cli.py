"""Every user mistake on the command line is one line naming the flag or field
and the fix, exit status 2, and nothing written; never a traceback."""

import os
import subprocess
import sys

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from nin_jax import cli
from nin_jax import config_lib
from nin_jax import validation

from helpers import REPO, error_lines

QUICKSTART = str(REPO / 'configs' / 'quickstart.py')


def parse(argv, capsys):
  """Parses `argv` with nin_jax.main's flags; returns (exit code, stderr)."""
  argv = ['nin_jax.main', *argv]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config file',
                                  flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  flags.DEFINE_string('workdir', None, 'workdir', flag_values=fv)
  flags.mark_flag_as_required('workdir', flag_values=fv)
  try:
    cli.parse_flags(argv, fv)
  except SystemExit as e:
    return e.code, capsys.readouterr().err
  return 0, capsys.readouterr().err


def assert_one_line(err, *needles):
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  assert lines[0].startswith('nin_jax: error: '), err
  assert 'Traceback' not in err
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize('override, nearest', [
    ('--config.batch_sise=3', '--config.train.batch_size'),
    ('--config.no_such_field=3', 'config_lib.py'),
    ('--config.model.hed=fc', '--config.model.head'),
    ('--config.model.nope.x=3', "'model.nope.x'"),
    ('--config.qqqq=3', 'config_lib.py'),
    ('--config.lerning_rate=0.1', '--config.optim.learning_rate'),
])
def test_unknown_field_is_one_line_with_the_nearest(override, nearest,
                                                    capsys):
  code, err = parse([f'--config={QUICKSTART}', '--workdir=w', override],
                    capsys)
  assert code == 2
  assert_one_line(err, override.split('=')[0], nearest)


@pytest.mark.parametrize('override, kind', [
    ('--config.train.batch_size=abc', 'int'),
    ('--config.train.batch_size=1.5', 'int'),
    ('--config.optim.learning_rate=fast', 'float'),
    ('--config.model=3', 'ConfigDict'),
])
def test_value_of_the_wrong_type_is_one_line(override, kind, capsys):
  code, err = parse([f'--config={QUICKSTART}', '--workdir=w', override],
                    capsys)
  assert code == 2
  assert_one_line(err, override.split('=')[0], kind)


def test_missing_or_failing_config_file_is_one_line(capsys):
  code, err = parse(['--config=configs/no_such.py', '--workdir=w'], capsys)
  assert code == 2
  assert_one_line(err, 'configs/no_such.py', 'No such file')
  code, err = parse([f'--config={REPO}/configs/cifar10.py:nonsense',
                     '--workdir=w'], capsys)
  assert code == 2
  assert_one_line(err, 'cifar10.py:nonsense', "variants are ('gap'")
  code, err = parse([f'--config={QUICKSTART}:extra', '--workdir=w'], capsys)
  assert code == 2
  assert_one_line(err, 'quickstart.py:extra', 'positional argument')


def test_missing_required_and_unknown_flags_are_one_line(capsys):
  code, err = parse([f'--config={QUICKSTART}'], capsys)
  assert code == 2
  assert_one_line(err, '--workdir=None: Flag --workdir must have a value '
                  'other than None.')
  code, err = parse([f'--config={QUICKSTART}', '--workdir=w', '--wrokdir=x'],
                    capsys)
  assert code == 2
  assert_one_line(err, "Unknown command line flag 'wrokdir'",
                  'Did you mean: workdir')


def test_valid_flags_parse(capsys):
  code, err = parse([f'--config={QUICKSTART}', '--workdir=w',
                     '--config.train.batch_size=32', '--config.model.head=fc'],
                    capsys)
  assert code == 0 and not err


def wrong_values(default):
  """Values of the wrong type (and non-finite numbers) for a field."""
  if isinstance(default, bool):
    return ['yes', 1, None]
  if isinstance(default, int):
    return ['8', 1.5, None, True]
  if isinstance(default, float):
    return ['0.1', None, float('nan'), float('inf')]
  if isinstance(default, str):
    return [3, None, b'x']
  if isinstance(default, tuple):
    return [5, ('a',), None]
  raise AssertionError(default)


def fields(config, prefix=''):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from fields(value, f'{prefix}{key}.')
    else:
      yield prefix + key, value


def with_value(field, value):
  """default_config() as a plain dict with `field` set to `value`."""
  d = config_lib.default_config().to_dict()
  node = d
  *parents, last = field.split('.')
  for p in parents:
    node = node[p]
  node[last] = value
  return ml_collections.ConfigDict(d)


def test_every_field_rejects_wrong_types_naming_the_field():
  checked = 0
  for field, default in fields(config_lib.default_config()):
    for value in wrong_values(default):
      with pytest.raises(config_lib.ConfigError,
                         match=rf'config\.{field}\b') as e:
        validation.validate_config(with_value(field, value))
      assert len(str(e.value).splitlines()) == 1
      checked += 1
  assert checked > 100


def test_misspelt_field_in_a_config_file_names_the_nearest():
  c = ml_collections.ConfigDict(config_lib.default_config().to_dict())
  c.train.batch_sise = 3
  with pytest.raises(config_lib.ConfigError,
                     match=r'did you mean config\.train\.batch_size\b'):
    validation.validate_config(c)
  c = config_lib.default_config().to_dict()
  del c['train']['seed']
  with pytest.raises(config_lib.ConfigError, match='config.train.seed is missing'):
    validation.validate_config(ml_collections.ConfigDict(c))


@pytest.mark.parametrize('field, value', [
    ('train.seed', -1), ('data.data_workers', 10**6),
    ('train.num_epochs', 0.0), ('train.batch_size', 0),
    ('train.eval_batch_size', -5), ('optim.learning_rate', 0.0),
    ('optim.momentum', 1.0), ('model.dropout_rate', 1.0),
    ('optim.lr_decay', 0.0), ('optim.lr_boundaries_epochs', (-1.0,)),
    ('data.translate_pixels', -1), ('data.image_size', 32),
    ('optim.warmup_epochs', -1.0), ('runtime.cpu_devices', -1),
    ('train.profile_steps', -2), ('model.dtype', 'float64'),
    ('model.preset', 'resnet'), ('optim.schedule', 'linear'),
    ('data.preprocessing', 'pca'), ('model.conv_impl', 'cudnn')])
def test_out_of_range_values_name_the_field(field, value):
  with pytest.raises(config_lib.ConfigError, match=rf'config\.{field}\b'):
    validation.validate_config(with_value(field, value))


def run_main(*args, env=None, timeout=120):
  full_env = dict(os.environ, JAX_PLATFORMS='cpu', **(env or {}))
  full_env.pop('XLA_FLAGS', None)
  return subprocess.run([sys.executable, '-m', 'nin_jax.main', *args],
                        cwd=REPO, env=full_env, capture_output=True,
                        text=True, timeout=timeout)


def test_main_typo_writes_nothing(tmp_path):
  workdir = tmp_path / 'run'
  out = run_main('--config=configs/quickstart.py', f'--workdir={workdir}',
                 '--config.batch_sise=3')
  assert out.returncode == 2
  assert 'Traceback' not in out.stderr
  assert error_lines(out.stderr) == [
      "nin_jax: error: --config.batch_sise=3: the config has no field "
      "'batch_sise'; did you mean --config.train.batch_size?"]
  assert not workdir.exists()


def test_main_names_the_group_of_a_field_given_without_it(tmp_path):
  workdir = tmp_path / 'run'
  out = run_main('--config=configs/quickstart.py', f'--workdir={workdir}',
                 '--config.learning_rate=0.05')
  assert out.returncode == 2 and 'Traceback' not in out.stderr
  assert error_lines(out.stderr) == [
      "nin_jax: error: --config.learning_rate=0.05: the config has no field "
      "'learning_rate'; did you mean --config.optim.learning_rate?"]
  assert not workdir.exists()


@pytest.mark.parametrize('leaf, dotted', sorted(
    (leaf, f'{group}.{leaf}') for group in config_lib.SUBTREES
    for leaf in config_lib.default_config()[group]))
def test_a_config_file_with_a_field_outside_its_group_names_the_group(
    leaf, dotted):
  c = config_lib.default_config()
  group, _ = dotted.split('.')
  c[leaf] = c[group][leaf]
  with pytest.raises(config_lib.ConfigError) as e:
    validation.validate_config(c)
  assert str(e.value) == (f'config.{leaf}: no such field; did you mean '
                          f'config.{dotted}?')


def test_onednn_requested_but_unavailable_is_one_line(tmp_path):
  workdir = tmp_path / 'run'
  out = run_main('--config=configs/quickstart.py', f'--workdir={workdir}',
                 '--config.model.conv_impl=onednn',
                 env={'NIN_JAX_ONEDNN_ROOT': str(tmp_path / 'nowhere')})
  assert out.returncode == 2, out.stderr[-2000:]
  assert 'Traceback' not in out.stderr
  [line] = error_lines(out.stderr)
  assert line.startswith("nin_jax: error: config.model.conv_impl='onednn': "
                         'the oneDNN kernels are unavailable: '), line
  assert line.endswith("; use config.model.conv_impl='auto' (oneDNN where it "
                       "works, XLA elsewhere) or 'xla'."), line
  assert not (workdir / 'checkpoints').exists()


@pytest.mark.slow
def test_workdir_without_a_readable_checkpoint_is_one_line(tmp_path):
  workdir = tmp_path / 'run'
  args = ['--config=configs/quickstart.py', f'--workdir={workdir}',
          '--config.train.num_train_steps=4', '--config.train.checkpoint_every_steps=2']
  assert run_main(*args).returncode == 0
  saved = sorted(p for p in (workdir / 'checkpoints').iterdir()
                 if p.name.isdigit())
  assert [p.name for p in saved] == ['2', '4']
  for step_dir in saved:
    for f in step_dir.rglob('_METADATA'):
      f.unlink()
  out = run_main(*args, '--config.train.num_train_steps=6')
  assert out.returncode == 2, out.stderr[-2000:]
  assert 'Traceback' not in out.stderr
  [line] = error_lines(out.stderr)
  assert 'No readable checkpoint' in line and 'steps [4, 2]' in line
  # Nothing already saved is lost.
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()
                if p.name.isdigit()) == ['2', '4']
