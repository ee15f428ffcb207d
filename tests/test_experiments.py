"""The experiment scripts no other test runs: experiments/train_mnist.py,
experiments/train_cifar10.py and experiments/input_benchmark.py, each run as
a user runs it (`python -m experiments.NAME` in the repository root), cut to
seconds of work: a few steps of small batches on a tiny Keras-layout .npz of
random pixels, or a few synthetic images. What they produce is checked, not
how fast: the numbers they time are wall-clock rates of a shared machine."""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from experiments import common
from nin_jax import metric_writers

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_module(name, *args):
  """`python -m experiments.NAME ARGS` in the repository root, without
  PYTHONPATH (as a user runs it); the completed process."""
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  return subprocess.run([sys.executable, '-m', f'experiments.{name}', *args],
                        cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600, check=False)


def write_npz(path, image_shape, num_train=64, num_test=20):
  """A Keras-layout .npz (x_train, y_train, x_test, y_test) of random uint8
  pixels, every class in both splits."""
  rng = np.random.default_rng(0)
  np.savez(path,
           x_train=rng.integers(0, 256, (num_train, *image_shape), np.uint8),
           y_train=np.arange(num_train) % 10,
           x_test=rng.integers(0, 256, (num_test, *image_shape), np.uint8),
           y_test=np.arange(num_test) % 10)
  return str(path)


def check_training(proc, name, workdir, npz, steps, preprocessing):
  """The script's last line, config.json and metrics of a run of `steps`
  steps on the 20 test images of `npz`."""
  assert proc.returncode == 0, proc.stderr[-3000:]
  last = proc.stdout.strip().splitlines()[-1]
  match = re.fullmatch(
      rf'{name}: test error (\d+\.\d\d)% \(20 test images\) after {steps} '
      rf'steps, wall time \d+ s, workdir {re.escape(str(workdir))}', last)
  assert match, last
  config = json.loads((workdir / 'config.json').read_text())
  assert config['model']['preset'] == name
  assert config['data']['dataset'] == f'npz:{npz}'
  assert config['data']['preprocessing'] == preprocessing
  assert config['train']['num_train_steps'] == steps
  tests = [r for r in metric_writers.read_metrics(str(workdir))
           if r['split'] == 'test']
  assert [(r['step'], r['examples']) for r in tests] == [(steps, 20)]
  assert match.group(1) == f'{100 * tests[0]["error"]:.2f}'
  assert (workdir / 'checkpoints' / str(steps)).is_dir()


@pytest.mark.slow
@pytest.mark.parametrize('name, shape, steps, preprocessing', [
    ('mnist', (28, 28), 2, 'scale'),
    ('cifar10', (32, 32, 3), 1, 'gcn_zca'),
])
def test_train_script_trains_its_config_on_an_npz(name, shape, steps,
                                                  preprocessing, tmp_path):
  """experiments/train_mnist.py and train_cifar10.py on a small npz."""
  npz = write_npz(tmp_path / f'{name}.npz', shape)
  workdir = tmp_path / f'{name}_run'
  proc = run_module(f'train_{name}', f'--workdir={workdir}', f'--npz={npz}',
                    f'--steps={steps}', '--config.train.batch_size=8',
                    '--config.train.eval_batch_size=10',
                    '--config.runtime.cpu_devices=1')
  check_training(proc, name, workdir, npz, steps, preprocessing)
  if preprocessing == 'gcn_zca':
    # The GCN + ZCA statistics of the training images, kept with the run.
    assert (workdir / 'preprocessing.json').is_file()
    assert (workdir / 'preprocessing.npz').is_file()


def test_train_mnist_says_which_npz_is_missing(tmp_path):
  missing = tmp_path / 'nowhere' / 'mnist.npz'
  proc = run_module('train_mnist', f'--workdir={tmp_path / "run"}',
                    f'--npz={missing}', '--steps=1')
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      f'mnist: error: config.data.dataset=npz:{missing}: no such file; point '
      "it at a .npz with keys ('x_train', 'y_train', 'x_test', 'y_test').")
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_input_benchmark_times_every_stage_of_an_npz(tmp_path):
  npz = write_npz(tmp_path / 'cifar10.npz', (32, 32, 3))
  proc = run_module('input_benchmark', '--source=npz', f'--npz={npz}',
                    '--num_images=64', '--batch_size=8', '--num_batches=2',
                    '--num_steps=1', '--tfds_images=16', '--json')
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert {k: result[k] for k in ('source', 'num_images', 'batch_size',
                                 'backend')} == {
      'source': 'npz', 'num_images': 64, 'batch_size': 8, 'backend': 'cpu'}
  assert sorted(result['rows']) == ['tfds_read', 'train_batches',
                                    'train_step']
  for row in result['rows'].values():
    assert row['images_per_sec'] > 0
  rows = result['rows']
  assert result['input_over_step'] == pytest.approx(
      rows['train_batches']['batches_per_sec']
      / rows['train_step']['batches_per_sec'], rel=1e-9)


def test_input_benchmark_streams_synthetic_imagenet_jpegs():
  proc = run_module('input_benchmark', '--source=imagenet',
                    '--imagenet_images=4', '--batch_size=2',
                    '--data_workers=1')
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert lines[0] == ('streamed imagenet2012: 4 synthetic 375x500 JPEGs, '
                      '224x224 crops, batch 2, 1 decoding threads, one '
                      'process')
  assert [line.split()[0] for line in lines[1:]] == ['stream_train',
                                                     'stream_eval']
  for line in lines[1:]:  # Rates of a shared machine: their form only.
    assert re.fullmatch(r'stream_(train|eval) +\d+ images/s', line), line


# ------------------------------------------------ experiments/common.py --

def test_overrides_are_parsed_as_the_launcher_parses_them():
  """Values typed on the command line take the field's type (as
  `python -m nin_jax.main` gives them), Python values their spelling."""
  c = common.load_config('configs/cifar10.py:faithful', [
      ('optim.learning_rate', '0.05'), ('model.head', 'fc'),
      ('data.augment', 'False'), ('train.num_epochs', 2.5),
      ('data.dataset', 'npz:/a/b.npz')])
  assert c.optim.learning_rate == 0.05 and c.model.head == 'fc'
  assert c.data.augment is False and c.train.num_epochs == 2.5
  assert c.data.dataset == 'npz:/a/b.npz' and not c.model.batch_norm
  assert common.override('train.num_epochs', 2.0) == (
      '--config.train.num_epochs=2.0')


@pytest.mark.parametrize('fields, message', [
    ([('train.sed', '1')], "--config.train.sed=1: the config has no field "
     "'train.sed'; did you mean --config.train.seed"),
    ([('train.seed', 'abc')], 'config.train.seed holds a value of type int'),
])
def test_a_bad_override_is_the_launchers_one_line(fields, message):
  with pytest.raises(common.UserError, match=re.escape(message)):
    common.load_config('configs/quickstart.py', fields)


def test_parse_args_takes_overrides_and_refuses_anything_else(capsys):
  parser = common.ArgumentParser('script')
  parser.add_argument('--steps', type=int)
  args, overrides = common.parse_args(
      parser, ['--config.train.seed=3', '--steps=2', '--config.a.b=x=y'])
  assert args.steps == 2
  assert overrides == [('train.seed', '3'), ('a.b', 'x=y')]
  for bad in ('--set', '--config.train.seed'):
    with pytest.raises(SystemExit) as exit_info:
      common.parse_args(parser, [bad])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"script: error: unrecognized argument '{bad}' (config fields are "
        'set with --config.GROUP.FIELD=VALUE)\n')


def test_metrics_once_per_step_and_steps_per_epoch(tmp_path):
  records = [
      {'step': 10, 'split': 'train', 'epoch': 0.5, 'loss': 2.0},
      {'step': 10, 'split': 'test', 'error': 0.5},
      {'step': 20, 'split': 'train', 'epoch': 1.0, 'loss': 1.0},
      {'step': 20, 'split': 'test', 'error': 0.4},
      {'step': 20, 'split': 'test', 'error': 0.9},  # A resumed run's again.
  ]
  (tmp_path / 'metrics.jsonl').write_text(
      ''.join(json.dumps(r) + '\n' for r in records))
  train, evals = common.read_metrics(str(tmp_path))
  assert [r['step'] for r in train] == [10, 20]
  assert [r['error'] for r in evals] == [0.5, 0.4]
  assert common.steps_per_epoch(train) == 20.0
  assert common.steps_per_epoch(evals) is None
  assert common.read_metrics(str(tmp_path / 'none')) == ([], [])


def test_a_function_runs_in_a_process_of_its_own():
  records = [{'split': 'train', 'step': 30, 'epoch': 1.5}]
  assert common.call_in_process(common.steps_per_epoch,
                                records=records) == 20.0
  with pytest.raises(common.WorkerError,
                     match=r'(?s)exited with 1:.*KeyError'):
    common.call_in_process(common.steps_per_epoch, records=[{'step': 1}])
