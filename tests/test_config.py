"""Every bad input is refused with a one-line error naming the field or file,
before anything is compiled or written."""

import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from helpers import error_lines, grouped
from nin_jax import config_lib
from nin_jax import input_pipeline
from nin_jax import layers
from nin_jax import models
from nin_jax import sources
from nin_jax import train
from nin_jax import validation

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (REPO / 'configs').glob('*.py'))


@pytest.mark.parametrize('name', CONFIGS)
def test_every_shipped_config_is_valid(name):
  path = REPO / 'configs' / name
  validation.validate_config(config_lib.load_config_file(str(path)),
                             num_devices=1)
  assert 'python -m nin_jax.main' in path.read_text().split('"""')[1]


BAD_FIELDS = [
    ('preset', 'resnet50', 'config.model.preset'),
    ('dataset', 'cifar10', 'config.data.dataset'),
    ('dataset', 'tfds:coco', 'config.data.dataset'),
    ('dataset', 'sklearn:iris', 'config.data.dataset'),
    ('schedule', 'linear', 'config.optim.schedule'),
    ('optimizer', 'adam', 'config.optim.optimizer'),
    ('preprocessing', 'pca', 'config.data.preprocessing'),
    ('cache_dir', 'gs://bucket/cache', "config.data.cache_dir='gs://bucket/cache': must be a local directory"),
    ('batch_size', 0, 'config.train.batch_size'),
    ('batch_size', -8, 'config.train.batch_size'),
    ('eval_batch_size', 0, 'config.train.eval_batch_size'),
    ('learning_rate', 0.0, 'config.optim.learning_rate'),
    ('learning_rate', -0.1, 'config.optim.learning_rate'),
    ('num_epochs', 0.0, 'config.train.num_epochs'),
    ('num_train_steps', 0, 'config.train.num_train_steps'),
    ('momentum', 1.0, 'config.optim.momentum'),
    ('weight_decay', -1e-4, 'config.optim.weight_decay'),
    ('model.dropout_rate', 1.0, 'config.model.dropout_rate'),
    ('model.dropout_rate', -0.1, 'config.model.dropout_rate'),
    ('model.head', 'attention', 'config.model.head'),
    ('model.weight_init', 'xavier', 'config.model.weight_init'),
    ('dtype', 'float64', 'config.model.dtype'),
    ('log_every_steps', 0, 'config.train.log_every_steps'),
    ('cpu_devices', -1, 'config.runtime.cpu_devices'),
    ('max_train_examples', -5, 'config.data.max_train_examples'),
]


def set_field(c, field, value):
  """Sets FIELD (dotted, or named by its last part alone) to `value`."""
  if '.' not in field:
    [(group, _)] = grouped({field: value}).items()
    field = f'{group}.{field}'
  node = c
  *parents, last = field.split('.')
  for p in parents:
    node = node[p]
  node[last] = value


@pytest.mark.parametrize('field,value,message', BAD_FIELDS)
def test_bad_field_is_named(field, value, message, tmp_path):
  c = config_lib.default_config()
  c.data.dataset = 'sklearn:digits'
  set_field(c, field, value)
  workdir = tmp_path / 'run'
  with pytest.raises(config_lib.ConfigError, match=message.replace('.', r'\.')):
    train.train_and_evaluate(c, str(workdir))
  assert not workdir.exists()


def test_batch_must_divide_over_devices():
  c = config_lib.default_config()
  c.train.batch_size = 100
  with pytest.raises(config_lib.ConfigError,
                     match=r'config\.train\.batch_size=100.*8 devices.*96'):
    validation.validate_config(c, num_devices=8)


def test_image_too_small_for_preset(tmp_path):
  """8x8 images (an npz of a name nin-jax does not know, so no class count to
  compare first) for the ImageNet preset, which pools 224x224 inputs down."""
  images = np.zeros((16, 8, 8, 3), np.uint8)
  np.savez(tmp_path / 'tiny.npz', x_train=images, y_train=np.arange(16),
           x_test=images[:4], y_test=np.arange(4))
  c = config_lib.default_config()
  c.model.preset, c.data.dataset = 'imagenet', f'npz:{tmp_path / "tiny.npz"}'
  with pytest.raises(config_lib.ConfigError,
                     match=r"config\.model\.preset='imagenet' cannot take 8x8"):
    train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  c = config_lib.default_config()
  c.data.dataset = 'sklearn:digits'
  with pytest.raises(
      config_lib.ConfigError,
      match=re.escape(f"--workdir={str(blocker / 'run')!r} is not writable "
                      f'({blocker} is not a writable directory); choose '
                      'another workdir.')):
    train.train_and_evaluate(c, str(blocker / 'run'))


def write_npz(path, **overrides):
  arrays = dict(
      x_train=np.zeros((20, 8, 8), np.uint8), y_train=np.arange(20) % 10,
      x_test=np.zeros((10, 8, 8), np.uint8), y_test=np.arange(10) % 10)
  arrays.update(overrides)
  arrays = {k: v for k, v in arrays.items() if v is not None}
  np.savez(path, **arrays)
  return path


@pytest.mark.parametrize('overrides,message', [
    ({'y_test': None}, r"missing keys \['y_test'\]"),
    ({'x_train': np.zeros((20, 8, 8), np.float32)}, 'x_train has dtype float32'),
    ({'x_train': np.zeros((20, 8), np.uint8)},
     r'x_train has shape \(20, 8\); expected \[n, height, width\]'),
    ({'y_train': np.arange(19)}, r'y_train has shape \(19,\)'),
    ({'y_train': np.arange(20) * 1.0}, 'y_train has dtype float64'),
    ({'x_test': np.zeros((10, 9, 9), np.uint8)},
     r'x_train images are \(8, 8, 1\) but x_test images are \(9, 9, 1\)'),
    ({'y_train': np.arange(20)}, r'labels span \[0, 19\].*10 classes'),
    ({'y_test': -np.ones(10, np.int64)}, r'labels span \[-1, -1\]'),
])
def test_bad_npz_is_named(tmp_path, overrides, message):
  path = write_npz(tmp_path / 'bad.npz', **overrides)
  c = config_lib.default_config()
  c.model.preset, c.data.dataset = 'quickstart', f'npz:{path}'
  with pytest.raises(input_pipeline.DataError, match=message):
    train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_npz_missing_or_needing_pickle(tmp_path):
  c = config_lib.default_config()
  c.model.preset, c.data.dataset = 'quickstart', f'npz:{tmp_path}/nope.npz'
  with pytest.raises(input_pipeline.DataError,
                     match=r'nope\.npz: no such file; point it at a \.npz '
                     r'with keys'):
    train.train_and_evaluate(c, str(tmp_path / 'run'))
  objects = np.empty(20, dtype=object)
  path = write_npz(tmp_path / 'pickled.npz', y_train=objects)
  c.data.dataset = f'npz:{path}'
  with pytest.raises(input_pipeline.DataError,
                     match=r'pickled\.npz: cannot be read without pickle'):
    train.train_and_evaluate(c, str(tmp_path / 'run'))
  (tmp_path / 'junk.npz').write_bytes(b'not a zip file')
  c.data.dataset = f'npz:{tmp_path}/junk.npz'
  with pytest.raises(input_pipeline.DataError,
                     match=r'junk\.npz: not a \.npz \(zip\) archive; save one '
                     r'with np\.savez'):
    train.train_and_evaluate(c, str(tmp_path / 'run'))


@pytest.mark.slow
def test_resuming_a_workdir_of_another_preset(quickstart_config, tmp_path):
  c = quickstart_config
  c.train.num_train_steps = 2
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(c, workdir)
  c.model.head = 'fc'
  with pytest.raises(config_lib.ConfigError,
                     match=r"holds checkpoints of config\.model\.head='gap' "
                     r"but this run has config\.model\.head='fc'"):
    train.train_and_evaluate(c, workdir)


def run_main(*args):
  return subprocess.run(
      [sys.executable, '-m', 'nin_jax.main', *args], cwd=REPO,
      capture_output=True, text=True, timeout=120)


def test_cli_unknown_field_and_bad_value(tmp_path):
  """The README's example of a misspelt grouped field, and a bad value: each
  one line naming the flag and the fix, exit status 2, nothing written."""
  out = run_main('--config=configs/quickstart.py', f'--workdir={tmp_path}/a',
                 '--config.train.batch_sise=3')
  assert out.returncode == 2, out.stderr[-2000:]
  assert 'Traceback' not in out.stderr
  assert error_lines(out.stderr) == [
      "nin_jax: error: --config.train.batch_sise=3: the config has no field "
      "'train.batch_sise'; did you mean --config.train.batch_size, "
      "--config.train.eval_batch_size, --config.train.seed?"]
  assert not (tmp_path / 'a').exists()
  out = run_main('--config=configs/quickstart.py', f'--workdir={tmp_path}/b',
                 '--config.model.preset=vgg')
  assert out.returncode == 2, out.stderr[-2000:]
  assert 'Traceback' not in out.stderr
  assert error_lines(out.stderr) == [
      "nin_jax: error: config.model.preset='vgg': must be one of "
      f"{sorted(models.PRESETS)}."]
  assert not (tmp_path / 'b').exists()


def test_conv_impl_is_validated_and_free_to_change_on_resume(
    quickstart_config, tmp_path):
  c = quickstart_config
  c.model.conv_impl = 'mkldnn'
  with pytest.raises(config_lib.ConfigError,
                     match=re.escape("config.model.conv_impl='mkldnn': must "
                                     "be one of ('auto', 'xla', 'onednn').")):
    validation.validate_config(c)
  c.model.conv_impl = 'xla'
  workdir = tmp_path / 'run'
  train.write_config(c, str(workdir))
  (workdir / 'checkpoints' / '5').mkdir(parents=True)
  c.model.conv_impl = 'auto'
  validation.check_resume_compatible(c, str(workdir))
  c.model.head = 'fc'
  with pytest.raises(config_lib.ConfigError,
                     match=r"holds checkpoints of config\.model\.head='gap' "
                     r"but this run has config\.model\.head='fc'; use a new "
                     r"workdir or the same model\.head\."):
    validation.check_resume_compatible(c, str(workdir))


def test_cifar100_faithful_variant_is_the_authors_solver():
  """cuda-convnet NIN/cifar-100_params: epsW 0.01 x coeff 2 = lr 0.02 on every
  layer (class maps included), biases x2, wc 0.001 x epsW 0.01 = 1e-5 per
  step = weight decay 5e-4 at lr 0.02."""
  c = config_lib.sibling_config(__file__, '../configs/cifar100.py',
                                'faithful')
  validation.validate_config(c, num_devices=1)
  assert (c.model.preset, c.model.weight_init, c.model.batch_norm) == (
      'cifar100', 'faithful', False)
  assert (c.optim.learning_rate, c.optim.bias_lr_mult,
          c.optim.last_layer_lr_mult) == (0.02, 2.0, 1.0)
  assert c.optim.learning_rate * c.optim.weight_decay == pytest.approx(1e-5)
  default = config_lib.sibling_config(__file__, '../configs/cifar100.py')
  assert (default.model.weight_init, default.optim.learning_rate) == (
      'modern', 0.1)


@pytest.mark.parametrize('name', ['cifar10.py', 'cifar10_aug.py',
                                  'cifar100.py', 'mnist.py', 'svhn.py'])
def test_every_dataset_config_has_the_authors_model_and_batchnorm(name):
  """The default trains with He init + BatchNorm; `:faithful` is the author's
  init without BatchNorm, everything else the default's dataset and data."""
  default = config_lib.sibling_config(__file__, f'../configs/{name}')
  faithful = config_lib.sibling_config(__file__, f'../configs/{name}',
                                       'faithful')
  for c in (default, faithful):
    validation.validate_config(c, num_devices=1)
  assert (default.model.weight_init, default.model.batch_norm) == (
      'modern', True)
  assert (faithful.model.weight_init, faithful.model.batch_norm) == (
      'faithful', False)
  assert faithful.data == default.data
  assert faithful.model.preset == default.model.preset
  with pytest.raises(ValueError, match=r'\.py:nope: variants are \('):
    config_lib.sibling_config(__file__, f'../configs/{name}', 'nope')


def test_imagenet_caffe_variant_is_the_zoo_solver():
  from nin_jax import optimizer  # pylint: disable=g-import-not-at-top
  c = config_lib.sibling_config(__file__, '../configs/imagenet.py', 'caffe')
  validation.validate_config(c, num_devices=1)
  assert (c.train.batch_size, c.train.num_train_steps,
          c.optim.weight_decay) == (64, 450_000, 5e-4)
  assert (c.model.weight_init, c.model.batch_norm) == ('faithful', False)
  per_epoch = 1_281_167 // c.train.batch_size
  schedule = optimizer.learning_rate_schedule(c.optim, per_epoch,
                                              c.train.num_train_steps)
  rates = [float(schedule(s)) for s in (0, 199_999, 200_000, 399_999,
                                        400_000, 449_999)]
  np.testing.assert_allclose(rates, [0.01, 0.01, 0.001, 0.001, 1e-4, 1e-4],
                             rtol=1e-6)
  with pytest.raises(ValueError,
                     match=re.escape("configs/imagenet.py:alexnet: variants "
                                     "are ('modern', 'caffe').")):
    config_lib.sibling_config(__file__, '../configs/imagenet.py', 'alexnet')


def test_core_modules_do_not_import_the_onednn_plugin():
  """models, config_lib and train run without the plugin: only
  conv_select.conv_module loads it, lazily, when a config asks for it."""
  code = ('import sys\n'
          'import nin_jax.models, nin_jax.config_lib, nin_jax.train, '
          'nin_jax.inference, nin_jax.conv_select, nin_jax.main\n'
          "print(sorted(m for m in sys.modules if 'plugins' in m))\n"
          'nin_jax.conv_select.conv_module("xla")\n'
          "print(sorted(m for m in sys.modules if 'plugins' in m))\n")
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split('\n')[:2] == ['[]', '[]']


def test_conv_select_xla_is_the_models_conv():
  from nin_jax import conv_select  # pylint: disable=g-import-not-at-top
  assert conv_select.conv_module('xla') is layers.Conv
  with pytest.raises(ValueError, match='conv_impl must be one of'):
    conv_select.conv_module('mkldnn')


def test_a_dataset_of_another_class_count_than_the_preset_is_refused_first(
    tmp_path, monkeypatch):
  """tfds:cifar100 (or an npz named after it) with the cifar10 preset: one
  line naming both fields and the presets that fit, before any data is read
  or the workdir made. A dataset whose class count nin-jax does not know
  (an npz of another name) is checked when its labels load instead."""
  def refuse(*args, **kwargs):
    raise AssertionError('data read before the config was checked')
  monkeypatch.setattr(sources, 'load_raw', refuse)
  c = config_lib.default_config()
  c.model.preset, c.data.dataset = 'cifar10', 'tfds:cifar100'
  message = ("config.model.preset='cifar10' makes 10 class maps, but "
             "config.data.dataset='tfds:cifar100' has 100 classes; use a "
             "preset made for it ('cifar100').")
  with pytest.raises(config_lib.ConfigError) as error:
    train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert str(error.value) == message
  assert not (tmp_path / 'run').exists()
  c.data.dataset = 'npz:/data/cifar100.npz'
  with pytest.raises(config_lib.ConfigError, match='has 100 classes'):
    validation.validate_config(c)
  c.model.preset, c.data.dataset = 'cifar100', 'tfds:mnist'
  with pytest.raises(config_lib.ConfigError) as error:
    validation.validate_config(c)
  assert str(error.value).endswith(
      "has 10 classes; use a preset made for it ('cifar10', 'mnist', "
      "'quickstart', 'svhn').")
  for preset, dataset in (('cifar100', 'tfds:cifar100'),
                          ('cifar10', 'npz:/data/my_images.npz'),
                          ('quickstart', 'sklearn:digits')):
    c.model.preset, c.data.dataset = preset, dataset
    validation.validate_config(c)
