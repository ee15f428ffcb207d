"""Using a trained model: evaluate, predict and export a workdir trained on
the genuine MNIST (a subset, for speed), as the commands do."""

import dataclasses
import functools
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

from helpers import command, error_lines, shared_data_dir
from nin_jax import config_lib
from nin_jax import inference
from nin_jax import input_pipeline
from nin_jax import input_spec
from nin_jax import metric_writers
from nin_jax import preprocessing
from nin_jax import sources
from nin_jax import tfds_source
from nin_jax import train

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 60


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
  monkeypatch.setattr(sources, 'load_raw', refuse)
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
  [line] = error_lines(out.stderr)
  assert line.startswith(f'nin_jax: error: {tmp_path / "missing.png"}: '
                         'cannot be read as an image ('), line

  damaged = tmp_path / 'damaged_workdir'
  shutil.copytree(workdir, damaged)
  (damaged / input_spec.JSON_NAME).unlink()
  out = command('export', f'--workdir={damaged}', f'--out={tmp_path / "x"}')
  assert out.returncode == 2 and 'Traceback' not in out.stderr
  assert error_lines(out.stderr) == [
      f'nin_jax: error: --workdir={damaged} has no preprocessing.json: '
      'nin_jax.main and nin_jax.caffe_import write it before anything else, '
      'so this is not a workdir they wrote (or it was damaged); train or '
      'import into a new workdir.']


def test_evaluate_refuses_test_time_flips_on_digits(run):
  workdir, _, _ = run
  out = command('evaluate', f'--workdir={workdir}', '--flip')
  assert out.returncode == 2 and 'Traceback' not in out.stderr
  dataset = pathlib.Path(workdir).parent / 'mnist.npz'
  assert error_lines(out.stderr) == [
      f'nin_jax: error: config.train.eval_flip=True: npz:{dataset} is a digit '
      'dataset, whose mirror images are not its classes; set it False.']


# ------------------------------------------ evaluate's flags, on moved data --

MOVED_TEST, MOVED_TRAIN = (30, 10), (4, 12)  # (labelled right, wrong) rows.


def clear_rows(probabilities, count):
  """`count` rows whose top probability beats the second by over 0.01: their
  predicted class cannot change between two compilations of the model."""
  top2 = np.sort(probabilities, 1)[:, -2:]
  rows = np.flatnonzero(top2[:, 1] - top2[:, 0] > 0.01)
  assert len(rows) >= count
  return rows[:count]


def relabelled(images, probabilities, right, wrong):
  """(images, labels, accuracy, loss): the first `right` rows labelled with
  the model's prediction, the next `wrong` with another class, so the
  evaluation of exactly these arrays has a known accuracy and loss."""
  predicted = probabilities.argmax(1)
  labels = np.concatenate([predicted[:right],
                           (predicted[right:right + wrong] + 1) % 10])
  n = right + wrong
  loss = -np.log(probabilities[np.arange(n), labels].astype(np.float64))
  return (images[:n], labels.astype(np.int32), right / n, float(loss.mean()))


@pytest.fixture(scope='module')
def moved(run, outputs, tmp_path_factory):
  """The run's data moved: MNIST test images relabelled (relabelled()) as a
  test split of 40 and a train split of 16, written both as
  DIR/mnist.npz and as a prepared TFDS mnist in DIR/tfds. Returns
  (DIR, {'test': (accuracy, loss), 'train': (...)}) at step 60."""
  _, probabilities = outputs
  x = run[2]['x_test']
  rows = clear_rows(probabilities, sum(MOVED_TEST) + sum(MOVED_TRAIN))
  test, train_rows = rows[:sum(MOVED_TEST)], rows[sum(MOVED_TEST):]
  xt, yt, *expect_test = relabelled(x[test], probabilities[test], *MOVED_TEST)
  xr, yr, *expect_train = relabelled(x[train_rows], probabilities[train_rows],
                                     *MOVED_TRAIN)
  directory = tmp_path_factory.mktemp('moved')
  np.savez(directory / 'mnist.npz', x_train=xr, y_train=yr, x_test=xt,
           y_test=yt)
  tfds_source.write_prepared('mnist', str(directory / 'tfds'), {
      'train': (xr[..., None], yr), 'test': (xt[..., None], yt)})
  return directory, {'test': tuple(expect_test), 'train': tuple(expect_train)}


def assert_evaluated(result, examples, accuracy, loss):
  """`result` is the evaluation of `examples` rows with the known `accuracy`
  and `loss` (from the fixture's probabilities: float32 rounding of two
  compilations of the same model, ~1e-6 relative; 1e-5 allows it)."""
  assert result['examples'] == examples, result
  assert result['accuracy'] == accuracy, result
  assert result['loss'] == pytest.approx(loss, rel=1e-5), result


def test_evaluate_dataset_and_split_read_the_named_arrays(run, moved):
  workdir = run[0]
  directory, expect = moved
  npz = f'npz:{directory / "mnist.npz"}'
  assert_evaluated(inference.evaluate(workdir, dataset=npz), 40,
                   *expect['test'])
  result = inference.evaluate(workdir, split='train', dataset=npz)
  assert_evaluated(result, 16, *expect['train'])
  assert result['step'] == STEPS
  # --data_dir: the TFDS copy of the same arrays; elsewhere, no copy.
  assert_evaluated(inference.evaluate(
      workdir, dataset='tfds:mnist', data_dir=str(directory / 'tfds')), 40,
                   *expect['test'])
  with pytest.raises(input_pipeline.DataError,
                     match=f'no prepared copy in {directory}/mnist/'):
    inference.evaluate(workdir, dataset='tfds:mnist', data_dir=str(directory))
  with pytest.raises(input_pipeline.DataError, match=re.escape(
      "this run trained on the whole training set (config.data."
      "validation_split=False), so it held out no 'validation' split; use "
      "'test'.")):
    inference.evaluate(workdir, split='validation')


def copy_with(workdir, destination, eval_flip, dataset=None):
  """A copy of `workdir` whose config.json says it evaluated with test-time
  flips or not (config.train.eval_flip) on `dataset` (None: the run's): what
  a run trained so saves, and all that evaluate, predict and export read of
  it."""
  shutil.copytree(workdir, destination)
  config = json.loads((destination / 'config.json').read_text())
  config['train']['eval_flip'] = eval_flip
  if dataset is not None:
    config['data']['dataset'] = dataset
  (destination / 'config.json').write_text(json.dumps(config))
  return str(destination)


def test_flip_and_noflip_on_a_run_evaluated_with_flips(run, tmp_path):
  """Mirror images of digits are other digits, so the flipped and plain
  evaluations differ by far more than rounding: the loss by more than 0.1."""
  x, y = run[2]['x_test'][:16], run[2]['y_test'][:16]
  # Not named mnist.npz: a generic dataset, whose flips nin-jax allows.
  np.savez(tmp_path / 'digits.npz', x_train=x, y_train=y, x_test=x, y_test=y)
  digits = f'npz:{tmp_path / "digits.npz"}'
  workdir = copy_with(run[0], tmp_path / 'flipped', True, digits)
  trained = inference.load(workdir)
  variables = {k: v for k, v in trained.variables.items() if v}
  images = preprocessing.apply(trained.inputs.fitted, x[..., None])
  apply = jax.jit(functools.partial(trained.model.apply, train=False))
  plain = np.asarray(apply(variables, images))
  mirror = np.asarray(apply(variables, images[:, :, ::-1]))
  expected = {}
  for name, logits in (('plain', plain), ('flip', (plain + mirror) / 2)):
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    top2 = np.sort(logits, 1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-3  # No near-ties.
    expected[name] = (float((logits.argmax(1) == y).mean()),
                      float(-log_p[np.arange(16), y].mean()), logits)
  assert abs(expected['flip'][1] - expected['plain'][1]) > 0.1
  as_run = inference.evaluate(workdir)
  assert_evaluated(as_run, 16, *expected['flip'][:2])
  assert_evaluated(inference.evaluate(workdir, flip=False), 16,
                   *expected['plain'][:2])
  # On the run that evaluated without flips, --flip is the same mean.
  plain_run = copy_with(run[0], tmp_path / 'plain', False, digits)
  assert inference.evaluate(plain_run, flip=True) == as_run
  # predict and export compute the same mean (float32 rounding: 1e-6).
  probabilities = jax.jit(inference.probabilities_fn(trained))(
      trained.variables, x[..., None])
  softmax = np.exp(expected['flip'][2])
  np.testing.assert_allclose(probabilities,
                             softmax / softmax.sum(1, keepdims=True),
                             atol=1e-6)


def test_evaluate_command_passes_its_flags(run, moved, tmp_path):
  """--step, --split, --dataset, --data_dir and --noflip reach the
  evaluation: without any one of them the line printed differs (step 60,
  40 examples, the run's 2,000 training images, no TFDS copy in the pinned
  TFDS_DATA_DIR, or flips refused on a digit dataset)."""
  directory, _ = moved
  workdir = copy_with(run[0], tmp_path / 'flipped', True)
  args = dict(step=30, split='train', dataset='tfds:mnist',
              data_dir=str(directory / 'tfds'))
  out = command('evaluate', f'--workdir={workdir}', '--noflip',
                *(f'--{k}={v}' for k, v in args.items()))
  assert out.returncode == 0, out.stderr[-2000:]
  printed = json.loads(out.stdout.strip().splitlines()[-1])
  assert printed == inference.evaluate(workdir, flip=False, **args)
  assert printed['step'] == 30 and printed['examples'] == 16


@pytest.mark.parametrize('flag, line', [
    pytest.param('--split=bogus', '--split=bogus: value should be one of '
                 '<|test|validation|train>', id='split'),
    pytest.param('--step=7', '--step=7: {workdir}/checkpoints has no '
                 'checkpoint at that step; it has steps [30, 60].', id='step'),
    pytest.param('--dataset=npz:{tmp}/none.npz', '--dataset=npz:{tmp}/none.npz:'
                 " no such file; point it at a .npz with keys ('x_train', "
                 "'y_train', 'x_test', 'y_test').", id='dataset'),
    # The data errors name training's --config.data.* flags; evaluate names
    # its own.
    pytest.param('--data_dir={tmp}', '--dataset=tfds:mnist: no prepared copy '
                 'in {tmp}/mnist/3.0.1 (TFDS data_dir {tmp}), and nin-jax never'
                 ' downloads. Either (1) point --data_dir=DIR at a TFDS '
                 'data_dir', id='data_dir'),
])
def test_evaluate_bad_flag_values_are_one_line(run, tmp_path, flag, line):
  workdir = run[0]
  extra = ['--dataset=tfds:mnist'] if flag.startswith('--data_dir') else []
  out = command('evaluate', f'--workdir={workdir}',
                flag.format(tmp=tmp_path), *extra)
  assert out.returncode == 2 and 'Traceback' not in out.stderr
  [error] = error_lines(out.stderr)
  assert error.startswith('nin_jax: error: ' + line.format(
      tmp=tmp_path, workdir=workdir)), error
  assert not out.stdout.strip()


# ------------------------------------------------------ export --platforms --

def test_export_lowers_for_the_platforms_asked(run, tmp_path):
  trained = inference.load(run[0])
  assert inference.export(trained, ['cpu']).platforms == ('cpu',)
  for bad in (['cpu', 'gpu'], []):
    with pytest.raises(config_lib.ConfigError) as e:
      inference.export(trained, bad)
    assert str(e.value) == (f'--platforms={",".join(bad)}: choose from '
                            "('cpu', 'cuda', 'rocm', 'tpu').")
  out = command('export', f'--workdir={run[0]}', '--platforms=rocm,cpu',
                f'--out={tmp_path / "a.jaxexport"}')
  assert out.returncode == 0, out.stderr[-2000:]
  exported = jax.export.deserialize((tmp_path / 'a.jaxexport').read_bytes())
  assert exported.platforms == ('rocm', 'cpu')
  out = command('export', f'--workdir={run[0]}', '--platforms=cpu,metal',
                f'--out={tmp_path / "b.jaxexport"}')
  assert out.returncode == 2 and 'Traceback' not in out.stderr
  assert error_lines(out.stderr) == [
      "nin_jax: error: --platforms=cpu,metal: choose from ('cpu', 'cuda', "
      "'rocm', 'tpu')."]
  assert not (tmp_path / 'b.jaxexport').exists()


# ------------------------------------- predict: channels and transparency --

# Colours whose grey under ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B) is
# at least 8 levels from their grey under BT.709's weights or the plain mean.
COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 50, 100))


def luma(rgb, weights=(0.299, 0.587, 0.114)):
  return float(np.dot(rgb, weights))


def blocks(colours, size=28):
  """A [size, size, len(colour)] uint8 image of four size/2 blocks."""
  half = size // 2
  image = np.zeros((size, size, len(colours[0])), np.uint8)
  for (top, left), colour in zip(((0, 0), (0, half), (half, 0),
                                  (half, half)), colours):
    image[top:top + half, left:left + half] = colour
  return image


def block_values(pixels):
  """The four blocks' values [4, channels], each block checked uniform."""
  half = pixels.shape[0] // 2
  values = []
  for top, left in ((0, 0), (0, half), (half, 0), (half, half)):
    block = pixels[top:top + half, left:left + half].reshape(-1,
                                                             pixels.shape[-1])
    assert (block == block[0]).all()
    values.append(block[0])
  return np.array(values)


def test_images_reach_the_model_in_its_channels(run, outputs, tmp_path):
  """Colour to grey by ITU-R 601 luma, grey to colour by copying, alpha
  dropped (a transparent pixel's colour is kept: no compositing on black or
  white); pixel values as the model's 8-bit data (MNIST: 0..255)."""
  trained, _ = outputs
  grey_spec = trained.inputs
  colour_spec = dataclasses.replace(grey_spec, image_shape=(28, 28, 3))
  assert grey_spec.image_shape == (28, 28, 1)
  assert grey_spec.fitted.max_value == 255  # load_image's units are 8-bit.
  for colour in COLOURS:
    for wrong in ((0.2126, 0.7152, 0.0722), (1 / 3, 1 / 3, 1 / 3)):
      assert abs(luma(colour) - luma(colour, wrong)) >= 8
  rgb = blocks(COLOURS)
  alpha = blocks(((0,), (255,), (0,), (128,)))
  files = {
      'rgb': Image.fromarray(rgb),
      'rgba': Image.fromarray(np.concatenate([rgb, alpha], -1)),
      'grey': Image.fromarray(blocks(((0,), (90,), (170,), (255,)))[..., 0]),
      'grey_alpha': Image.fromarray(np.concatenate(
          [blocks(((0,), (90,), (170,), (255,))), alpha], -1), 'LA'),
  }
  paths = {}
  for name, image in files.items():
    paths[name] = str(tmp_path / f'{name}.png')
    image.save(paths[name])
  load = lambda name, spec: block_values(inference.load_image(paths[name],
                                                              spec))
  greys = np.array([[luma(c)] for c in COLOURS])
  for name in ('rgb', 'rgba'):  # Pillow rounds the luma to an integer.
    np.testing.assert_allclose(load(name, grey_spec), greys, atol=0.5)
    np.testing.assert_array_equal(load(name, colour_spec), COLOURS)
  levels = np.array([[0], [90], [170], [255]], np.float32)
  for name in ('grey', 'grey_alpha'):
    np.testing.assert_array_equal(load(name, grey_spec), levels)
    np.testing.assert_array_equal(load(name, colour_spec),
                                  np.repeat(levels, 3, 1))
  # What classify hands the model for the colour file: its luma image.
  expected = np.repeat(np.repeat(np.round(greys).reshape(2, 2), 14, 0), 14, 1)
  [result] = inference.classify(trained, [paths['rgba']], top_k=10)
  probabilities = np.asarray(jax.jit(inference.probabilities_fn(trained))(
      trained.variables, expected[None, ..., None].astype(np.float32)))[0]
  for entry in result['top_k']:  # float32 rounding of two compilations.
    assert entry['probability'] == pytest.approx(
        probabilities[entry['class']], abs=1e-6)


# ------------------------------------------------------------------ top-5 --

class FixedLogits:
  """A stand-in for the model whose logits are its input images (rows)."""

  def apply(self, variables, images, train=False):
    del variables, train
    return images


@pytest.mark.parametrize('classes', [5, 6])
def test_top5_accuracy_only_for_more_than_5_classes(classes):
  """Evaluation (training's, and evaluate's: both train.evaluate) reports
  top-5 accuracy for models of more than 5 classes, counted as whether the
  label is among the 5 largest logits; with 5 or fewer it would always be
  1, and the key is absent."""
  rng = np.random.default_rng(classes)
  rows = 2 * classes
  logits = np.stack([rng.permutation(classes) for _ in range(rows)]
                    ).astype(np.float32)
  ranks = np.arange(rows) % classes  # The label's rank in its row: 0 = top.
  labels = np.argsort(-logits, 1)[np.arange(rows), ranks].astype(np.int32)
  state = train.TrainState(step=0, params={}, batch_stats={}, opt_state=None,
                           rng=None)
  batch = {'image': logits, 'label': labels, 'mask': np.ones(rows, bool)}
  metrics = train.evaluate(
      functools.partial(train.eval_step, model=FixedLogits()), state,
      (b for b in [batch]))
  assert metrics['accuracy'] == 1 / classes
  if classes <= 5:
    assert 'top5_accuracy' not in metrics, metrics
  else:
    assert metrics['top5_accuracy'] == 5 / classes
