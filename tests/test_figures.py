"""The figure scripts: experiments/confidence_maps.py (the paper's Figure 4)
and experiments/plot_curves.py, on one tiny quick-start run per session."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from experiments import confidence_maps
from experiments import plot_curves
from helpers import shared_run
from nin_jax import config_lib
from nin_jax import datasets
from nin_jax import inference
from nin_jax import metric_writers
from nin_jax import models
from nin_jax import sources
from nin_jax import train

REPO = pathlib.Path(__file__).resolve().parents[1]

STEPS = 44  # Two epochs of the digits (22 steps each): 2 evaluations.


def script(name, *args):
  """Runs `python -m experiments.NAME ARGS` in the repository root on one
  CPU device."""
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=1')
  return subprocess.run(
      [sys.executable, '-m', f'experiments.{name}', *args],
      capture_output=True, text=True, timeout=120, cwd=REPO, env=env)


def train_quickstart(directory):
  c = config_lib.load_config_file(str(REPO / 'configs' / 'quickstart.py'))
  c.train.num_train_steps = STEPS
  train.train_and_evaluate(c, str(directory))


@pytest.fixture(scope='session')
def workdir():
  """configs/quickstart.py trained 44 steps (about 10 s), once for both test
  tiers (helpers.shared_run): a GAP model with BatchNorm, logged at steps 20,
  40, 44 and evaluated at 22 and 44. Tests only read it or copy it."""
  return str(shared_run('figures_quickstart', train_quickstart))


def copy_with_config(workdir, destination, **model_fields):
  """A copy of `workdir` whose config.json has other `model_fields`."""
  shutil.copytree(workdir, destination)
  path = pathlib.Path(destination) / 'config.json'
  config = json.loads(path.read_text())
  config['model'].update(model_fields)
  path.write_text(json.dumps(config))
  return str(destination)


@pytest.fixture(scope='session')
def second_workdir(workdir, tmp_path_factory):
  """The run as if trained with the faithful init and no BatchNorm: its
  train losses doubled, its errors halved, and its last evaluation logged
  twice (as a finished run resumed logs it)."""
  path = copy_with_config(workdir, tmp_path_factory.mktemp('second') / 'run',
                          weight_init='faithful', batch_norm=False)
  records = metric_writers.read_metrics(path)
  for r in records:
    if r['split'] == 'train':
      r['loss'] *= 2
    else:
      r['error'] /= 2
  records.append(dict(records[-1], time=records[-1]['time'] + 500))
  (pathlib.Path(path) / 'metrics.jsonl').write_text(
      ''.join(json.dumps(r) + '\n' for r in records))
  return path


# ------------------------------------------------------- confidence maps --

def test_class_maps_are_what_the_logits_average(workdir):
  """The captured maps are the GAP head's input: their spatial mean is the
  logits, the logits are the model's plain output (sowing changes nothing),
  and the images are the test split's in pixel units, preprocessed as the
  exported model (inference.probabilities_fn) does."""
  trained = inference.load(workdir)
  result = confidence_maps.compute(trained, 'test', num_images=16)
  assert result.maps.shape == (16, 2, 2, 10)  # 8 -> 4 -> 2, one per class.
  assert np.ptp(result.maps, axis=(1, 2)).max() > 0  # Not broadcast logits.
  np.testing.assert_allclose(result.maps.mean(axis=(1, 2)), result.logits,
                             rtol=1e-5, atol=1e-5)
  _, inputs, labels = confidence_maps.load_examples(trained, 'test', 16)
  plain = trained.model.apply(trained.variables, inputs, train=False)
  np.testing.assert_allclose(result.logits, plain, rtol=1e-6, atol=1e-6)
  data = trained.config.data
  x_test, y_test, max_value = sources.load_raw_test(
      data, datasets.lookup(data.dataset))
  np.testing.assert_array_equal(result.pixels, x_test[:16])
  np.testing.assert_array_equal(result.labels, y_test[:16])
  np.testing.assert_array_equal(labels, y_test[:16])
  assert 1 < result.pixels.max() <= max_value == 16  # Digits' units.
  probabilities = inference.probabilities_fn(trained)(trained.variables,
                                                      result.pixels)
  np.testing.assert_allclose(jax.nn.softmax(result.logits), probabilities,
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('preset,size', [('mnist', 7), ('cifar10', 8)])
def test_class_maps_of_paper_presets(preset, size):
  """MNIST's 28x28x1 and CIFAR-10's 32x32x3 models (with BatchNorm) give
  maps [n, 7, 7, 10] and [n, 8, 8, 10] (shapes only, traced: the values are
  the quick-start test's)."""
  images = jax.ShapeDtypeStruct(
      (2, 28, 28, 1) if preset == 'mnist' else (2, 32, 32, 3), np.float32)
  model = models.create_model(preset, weight_init='modern', batch_norm=True)
  variables = jax.eval_shape(model.init, jax.random.key(1), images)
  assert set(variables) == {'params', 'batch_stats'}  # Nothing sown.
  trained = inference.TrainedModel(None, None, model, variables, 0)
  logits, maps = jax.eval_shape(confidence_maps.class_maps_fn(trained),
                                variables, images)
  assert logits.shape == (2, 10) and maps.shape == (2, size, size, 10)


@pytest.mark.slow
def test_confidence_maps_script_writes_png(workdir, tmp_path):
  out = tmp_path / 'maps.png'
  result = script('confidence_maps', f'--workdir={workdir}', f'--out={out}',
                  '--num_images=3')
  assert result.returncode == 0, result.stderr
  with Image.open(out) as image:
    width, height = image.size
    pixels = np.asarray(image.convert('L'))
  # 11 columns (image, 10 maps) and a colorbar; 3 rows.
  assert 1300 <= width <= 1700 and 380 <= height <= 500, image.size
  assert pixels.std() > 10  # Something drawn.


def test_confidence_maps_fc_head_is_one_line_error(workdir, tmp_path):
  fc = copy_with_config(workdir, tmp_path / 'fc', head='fc')
  out = tmp_path / 'maps.png'
  result = script('confidence_maps', f'--workdir={fc}', f'--out={out}')
  assert result.returncode == 2, result.stderr
  errors = [l for l in result.stderr.splitlines()
            if l.startswith('nin_jax: error:')]
  assert len(errors) == 1 and "model.head='fc'" in errors[0], result.stderr
  assert 'no class confidence maps' in errors[0]
  assert 'Traceback' not in result.stderr and not out.exists()


def test_plot_marks_classes_on_one_colour_scale():
  """RGB uint8 images (CIFAR's units), 12 classes shown 10 to a row: the
  highest-scoring ones with the true class; one colour scale for all."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 12)).astype(np.float32)
  labels = np.array([int(np.argmin(logits[0])), int(np.argmax(logits[1]))])
  result = confidence_maps.ClassMaps(
      rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8), labels, logits,
      rng.normal(size=(2, 8, 8, 12)).astype(np.float32))
  names = [f'class{k}' for k in range(12)]
  fig = confidence_maps.plot(result, names, 255.0, max_classes=10)
  axes = np.array(fig.axes[:-1]).reshape(2, 11)  # The last is the colorbar.
  # Row 0: true class (the lowest score) replaces the 10th best.
  shown = confidence_maps.shown_classes(logits[0], labels[0], 10)
  assert labels[0] in shown and len(set(shown)) == 10
  titles = [ax.get_title() for ax in axes[0, 1:]]
  assert titles == [names[k] for k in shown]
  predicted = int(np.argmax(logits[0]))
  title = axes[0, 1 + shown.index(predicted)].title
  assert title.get_fontweight() == 'bold' and title.get_color() == 'red'
  assert axes[0, 1 + shown.index(labels[0])].title.get_color() == 'green'
  assert axes[1, 1].title.get_color() == 'green'  # Right: best, true, first.
  assert axes[1, 1].title.get_fontweight() == 'bold'
  assert 'true: class' in axes[0, 0].get_ylabel()
  limits = {ax.get_images()[0].get_clim() for ax in axes[:, 1:].ravel()}
  assert len(limits) == 1
  np.testing.assert_array_equal(axes[0, 0].get_images()[0].get_array(),
                                result.pixels[0] / np.float32(255))


# ------------------------------------------------------------ curves --

def test_label_reads_preset_dataset_init_bn_head(quickstart_config):
  c = quickstart_config
  assert plot_curves.label(c) == 'quickstart, digits, modern + BN'
  c.data.dataset = 'npz:/data/mnist/mnist.npz'
  c.model.update(batch_norm=False, weight_init='faithful', head='fc')
  assert plot_curves.label(c) == 'quickstart, mnist, faithful, fc head'


def test_plot_curves_two_labelled_lines(workdir, second_workdir):
  runs = [plot_curves.read_run(w) for w in (workdir, second_workdir)]
  fig = plot_curves.plot(runs)
  expected = ['quickstart, digits, modern + BN',
              'quickstart, digits, faithful']
  assert [t.get_text() for t in fig.legends[0].get_texts()] == expected
  axes = np.array(fig.axes).reshape(2, 2)
  records = metric_writers.read_metrics(workdir)
  train_records = [r for r in records if r['split'] == 'train']
  eval_records = [r for r in records if r['split'] == 'test']
  for ax in axes.ravel():
    assert [l.get_label() for l in ax.get_lines()] == expected
  (loss, loss2), (error, error2) = (axes[0, 0].get_lines(),
                                    axes[0, 1].get_lines())
  np.testing.assert_allclose(loss.get_xdata(), [20 / 22, 40 / 22, 2.0])
  np.testing.assert_allclose(loss.get_ydata(),
                             [r['loss'] for r in train_records])
  np.testing.assert_allclose(loss2.get_ydata(), 2 * loss.get_ydata())
  # Evaluations at the end of epochs 1 and 2; the repeated one counted once.
  np.testing.assert_allclose(error.get_xdata(), [1.0, 2.0])
  np.testing.assert_allclose(error2.get_xdata(), [1.0, 2.0])
  np.testing.assert_allclose(error2.get_ydata(), error.get_ydata() / 2)
  # Time is the training time the train records carry, interpolated at
  # each evaluation's step.
  assert axes[1, 0].get_xlabel() == 'training time (s)'
  seconds = [r['train_seconds'] for r in train_records]
  np.testing.assert_allclose(axes[1, 0].get_lines()[0].get_xdata(), seconds)
  for line in axes[1, 1].get_lines():  # The first of the repeated ones.
    np.testing.assert_allclose(line.get_xdata(), np.interp(
        [r['step'] for r in eval_records],
        [r['step'] for r in train_records], seconds))


def test_equal_labels_name_the_fields_that_differ(workdir, tmp_path):
  """Runs that differ only in fields the label leaves out (the dropout
  ablation) are told apart by those fields, else by their workdirs."""
  runs = []
  for name, rate in (('with', 0.5), ('without', 0.0)):
    path = copy_with_config(workdir, tmp_path / name, dropout_rate=rate)
    runs.append(plot_curves.read_run(path))
  assert plot_curves._legend_labels(runs) == [
      'quickstart, digits, modern + BN (dropout_rate=0.5)',
      'quickstart, digits, modern + BN (dropout_rate=0.0)']
  # Fields that change nothing learnt are left out; the model's come first.
  for run, lr in zip(runs, (0.1, 0.05)):
    run.fields.update({'train.eval_every_steps': lr * 100,
                       'optim.learning_rate': lr})
  assert plot_curves._legend_labels(runs) == [
      'quickstart, digits, modern + BN (dropout_rate=0.5, learning_rate=0.1)',
      'quickstart, digits, modern + BN (dropout_rate=0.0, learning_rate=0.05)']
  same = [runs[0], runs[0]._replace(workdir=str(tmp_path / 'again'))]
  assert plot_curves._legend_labels(same) == [
      'quickstart, digits, modern + BN (with)',
      'quickstart, digits, modern + BN (again)']


def test_plot_curves_falls_back_to_wall_time_without_train_seconds(
    workdir, tmp_path):
  """Workdirs logged before records had train_seconds: wall time since the
  first record."""
  path = copy_with_config(workdir, tmp_path / 'old')
  records = metric_writers.read_metrics(path)
  for r in records:
    r.pop('train_seconds', None)
  (pathlib.Path(path) / 'metrics.jsonl').write_text(
      ''.join(json.dumps(r) + '\n' for r in records))
  run = plot_curves.read_run(path)
  start = min(r['time'] for r in records)
  np.testing.assert_allclose(
      run.train['seconds'],
      [r['time'] - start for r in records if r['split'] == 'train'])
  axes = np.array(plot_curves.plot([run]).axes).reshape(2, 2)
  assert axes[1, 0].get_xlabel() == (
      'wall time since the first logged record (s)')
  assert axes[0, 1].get_ylabel() == 'test error (%)'


@pytest.mark.slow
def test_plot_curves_script_writes_png(workdir, second_workdir, tmp_path):
  out = tmp_path / 'curves.png'
  result = script('plot_curves', workdir, second_workdir, f'--out={out}')
  assert result.returncode == 0, result.stderr
  with Image.open(out) as image:
    assert image.size == (1100, 800)


def test_plot_curves_errors(workdir, tmp_path):
  with pytest.raises(inference.WorkdirError, match='not a directory'):
    plot_curves.read_run(str(tmp_path / 'missing'))
  with pytest.raises(inference.WorkdirError, match='no config.json'):
    plot_curves.read_run(str(tmp_path))
  empty = copy_with_config(workdir, tmp_path / 'empty')
  (pathlib.Path(empty) / 'metrics.jsonl').unlink()
  with pytest.raises(inference.WorkdirError, match='no train records'):
    plot_curves.read_run(empty)
  result = script('plot_curves', workdir, str(tmp_path / 'missing'),
                  f'--out={tmp_path / "x.png"}')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      f'nin_jax: error: {tmp_path / "missing"} is not a directory, so not a '
      'nin-jax workdir.')
  assert 'Traceback' not in result.stderr


@pytest.mark.slow
def test_late_steps_times_the_initial_and_the_final_state(workdir):
  """experiments/late_steps.py on the quick-start run: its lines, in order."""
  result = script('late_steps', f'--workdir={workdir}', '--pairs=1',
                  '--steps=1')
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert lines[0] == 'devices: 1'
  assert re.fullmatch(r'subnormal params in final checkpoint: \d+ of \d+',
                      lines[1]), lines[1]
  assert [line.split()[:2] for line in lines[2:]] == [
      ['initial', 's/step'], ['final', 's/step']]
