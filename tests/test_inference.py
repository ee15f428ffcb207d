"""Using a trained model: evaluate, predict and export a workdir trained on
the genuine MNIST (a subset, for speed), as the commands do."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import shared_data_dir
from nin_jax import config_lib
from nin_jax import inference
from nin_jax import input_pipeline
from nin_jax import input_spec
from nin_jax import metric_writers
from nin_jax import preprocessing
from nin_jax import train

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 60


def command(module, *args):
  """Runs `python -m nin_jax.MODULE ARGS` on one CPU device."""
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=1')
  return subprocess.run([sys.executable, '-m', f'nin_jax.{module}', *args],
                        capture_output=True, text=True, timeout=300,
                        cwd=REPO, env=env)


def error_lines(stderr):
  return [l for l in stderr.splitlines() if l.startswith('nin_jax: error:')]


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """configs/mnist.py trained 60 steps on the first 2,000 MNIST training
  images, evaluated at steps 30 and 60 on the first 500 test images. Without
  dropout and with the class maps at the full learning rate it reaches about
  95% in these few steps."""
  source = shared_data_dir() / 'mnist' / 'mnist.npz'
  if not source.exists():
    pytest.skip(f'{source} not found; set NIN_JAX_DATA_DIR')
  root = tmp_path_factory.mktemp('mnist_run')
  with np.load(source) as f:
    arrays = dict(x_train=f['x_train'][:2000], y_train=f['y_train'][:2000],
                  x_test=f['x_test'][:500], y_test=f['y_test'][:500])
  np.savez(root / 'mnist.npz', **arrays)
  c = config_lib.sibling_config(__file__, '../configs/mnist.py')
  c.data.dataset = f'npz:{root / "mnist.npz"}'
  c.train.update(batch_size=32, eval_batch_size=250, num_train_steps=STEPS,
                 eval_every_steps=30, checkpoint_every_steps=30,
                 log_every_steps=30)
  c.optim.update(schedule='cosine', last_layer_lr_mult=1.0)
  c.model.dropout_rate = 0.0
  workdir = str(root / 'workdir')
  result = train.train_and_evaluate(c, workdir)
  return workdir, result, arrays


@pytest.fixture(scope='module')
def outputs(run):
  """The trained model and its probabilities [500, 10] of the test images."""
  _, _, arrays = run
  trained = inference.load(run[0])
  probabilities = inference.probabilities_fn(trained)(
      trained.variables, arrays['x_test'][..., None])
  return trained, np.asarray(probabilities)


def no_training_data(monkeypatch):
  """Fails the test if the training split is read or a statistic refitted."""
  def refuse(*args, **kwargs):
    raise AssertionError('training data read or preprocessing refitted')
  monkeypatch.setattr(input_pipeline, 'load_raw', refuse)
  monkeypatch.setattr(preprocessing, 'fit', refuse)


def test_evaluate_reproduces_the_runs_own_evaluations(run, outputs,
                                                      monkeypatch):
  workdir, result, arrays = run
  tests = [r for r in metric_writers.read_metrics(workdir)
           if r['split'] == 'test']
  assert [r['step'] for r in tests] == [30, STEPS]
  assert 'top5_accuracy' in tests[-1]  # Logged in training (10 classes).
  assert result['accuracy'] > 0.8, result  # It learnt.
  no_training_data(monkeypatch)
  # An earlier checkpoint here; the newest in test_commands_... (CLI).
  again = inference.evaluate(workdir, step=30)
  assert again['step'] == 30 and again['examples'] == 500
  for key in ('accuracy', 'top5_accuracy', 'error'):
    assert again[key] == tests[0][key], key
  assert again['loss'] == pytest.approx(tests[0]['loss'], rel=1e-6)
  # Top-5 counted independently, from the model's probabilities.
  top5 = np.argsort(-outputs[1], 1)[:, :5]
  in_top5 = (top5 == arrays['y_test'][:, None]).any(1).mean()
  assert abs(in_top5 - result['top5_accuracy']) <= 1 / 500


def test_predict_classifies_digit_images(run, outputs, tmp_path,
                                         monkeypatch):
  trained, probabilities = outputs
  x, y = run[2]['x_test'], run[2]['y_test']
  right = np.flatnonzero((probabilities.argmax(1) == y) &
                         (probabilities.max(1) > 0.9))[:4]
  assert len(right) == 4
  paths = []
  for i in right:  # As PNG, grayscale 28x28 and an RGB 56x56 version.
    paths.append(str(tmp_path / f'{i}_digit_{y[i]}.png'))
    Image.fromarray(x[i]).save(paths[-1])
    paths.append(str(tmp_path / f'{i}_big_{y[i]}.png'))
    Image.fromarray(x[i]).convert('RGB').resize((56, 56)).save(paths[-1])
  (tmp_path / 'broken.png').write_bytes(b'not an image')
  paths[2:2] = [str(tmp_path / 'broken.png'), str(tmp_path / 'none.jpg')]
  no_training_data(monkeypatch)
  results = list(inference.classify(trained, paths, top_k=3))
  assert [r['path'] for r in results] == paths
  errors = [r for r in results if 'error' in r]
  assert [r['path'] for r in errors] == paths[2:4]
  for r in errors:
    assert r['error'].startswith(f'{r["path"]}: cannot be read as an image')
  classified = [r for r in results if 'error' not in r]
  for result in classified:
    label = int(re.search(r'_(\d)\.png$', result['path']).group(1))
    top = result['top_k']
    assert len(top) == 3 and top[0]['class'] == label
    assert top[0]['name'] == str(label)
    assert top[0]['probability'] >= top[1]['probability'] >= top[2][
        'probability']
  # The 28x28 files give the model's probabilities of the arrays.
  for i, result in zip(right, classified[::2]):
    assert result['top_k'][0]['probability'] == pytest.approx(
        probabilities[i].max(), abs=1e-6)


PLAIN_JAX = r'''
import json, sys
import jax, numpy as np
exported = jax.export.deserialize(open(sys.argv[1], 'rb').read())
images = np.load(sys.argv[2])
out = {n: np.asarray(exported.call(images[:n])).tolist() for n in (3, 8)}
assert 'nin_jax' not in sys.modules
print(json.dumps(out))
'''


def test_export_runs_in_a_process_without_nin_jax(run, outputs, tmp_path,
                                                  monkeypatch):
  _, probabilities = outputs
  no_training_data(monkeypatch)
  exported = inference.export(inference.load(run[0]))
  assert exported.platforms == ('cpu', 'cuda', 'tpu')
  module = exported.mlir_module()
  assert 'stablehlo.convolution' in module
  assert set(re.findall(r'custom_call @(\w+)', module)) <= {'shape_assertion'}
  (tmp_path / 'nin.jaxexport').write_bytes(exported.serialize())
  images = run[2]['x_test'][:8, ..., None]  # uint8, as the dataset stores.
  np.save(tmp_path / 'images.npy', images)
  out = subprocess.run(
      [sys.executable, '-c', PLAIN_JAX, str(tmp_path / 'nin.jaxexport'),
       str(tmp_path / 'images.npy')], capture_output=True, text=True,
      timeout=300, check=True, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  served = {int(n): np.asarray(p) for n, p in
            json.loads(out.stdout.strip().splitlines()[-1]).items()}
  assert served[3].shape == (3, 10) and served[8].shape == (8, 10)
  np.testing.assert_allclose(served[3], served[8][:3], atol=1e-6)
  np.testing.assert_array_equal(served[3].argmax(1), served[8][:3].argmax(1))
  np.testing.assert_allclose(served[8], probabilities[:8], atol=1e-5)


def test_commands_print_json_and_one_line_errors(run, tmp_path):
  workdir, result, _ = run
  out = command('evaluate', f'--workdir={workdir}')
  assert out.returncode == 0, out.stderr[-2000:]
  printed = json.loads(out.stdout.strip().splitlines()[-1])
  assert list(printed) == ['loss', 'accuracy', 'top5_accuracy', 'error',
                           'examples', 'step']
  assert printed['accuracy'] == result['accuracy']

  digit = tmp_path / 'digit.png'
  Image.fromarray(np.zeros((28, 28), np.uint8)).save(digit)
  out = command('predict', f'--workdir={workdir}', '--json', '--top_k=2',
                str(digit), str(tmp_path / 'missing.png'))
  assert out.returncode == 2
  line = json.loads(out.stdout.strip())
  assert line['path'] == str(digit) and len(line['top_k']) == 2
  assert set(line['top_k'][0]) == {'class', 'name', 'probability'}
  assert len(error_lines(out.stderr)) == 1
  assert 'missing.png' in error_lines(out.stderr)[0]

  old = tmp_path / 'old_workdir'
  shutil.copytree(workdir, old)
  (old / input_spec.JSON_NAME).unlink()
  out = command('export', f'--workdir={old}', f'--out={tmp_path / "x"}')
  assert out.returncode == 2 and 'Traceback' not in out.stderr
  assert error_lines(out.stderr) == [
      f'nin_jax: error: {old} has no preprocessing.json (workdirs trained '
      f'before nin-jax saved its preprocessing); run its training command '
      f'once more, python -m nin_jax.main --config=CONFIG --workdir={old} '
      f'with the config it was trained with (see {old}/config.json): it '
      f'resumes at the last step, writes the file and trains no further.']


def test_evaluate_refuses_test_time_flips_on_digits(run):
  workdir, _, _ = run
  out = command('evaluate', f'--workdir={workdir}', '--flip')
  assert out.returncode == 2 and 'Traceback' not in out.stderr
  assert len(error_lines(out.stderr)) == 1
  assert 'config.train.eval_flip=True' in error_lines(out.stderr)[0]
