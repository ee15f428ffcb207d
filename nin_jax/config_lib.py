"""The default experiment config and its validation.

Every config in `configs/` starts from `default_config()` and changes a few
fields; `validate_config` checks a config before anything is compiled, loaded
or written, and names the offending field in its error.
"""

from __future__ import annotations

import difflib
import math
import os
from typing import Any, Optional, Sequence

import ml_collections

from nin_jax import conv_select
from nin_jax import datasets
from nin_jax import models
from nin_jax.errors import ConfigError

SCHEDULES = ('constant', 'step', 'plateau', 'cosine', 'one_cycle')
OPTIMIZERS = ('sgd', 'nesterov')
PREPROCESSING = ('scale', 'standardize', 'gcn_zca', 'lcn', 'none')
DTYPES = ('float32', 'bfloat16', 'float16')
# Per-pixel normalizations a streamed dataset can use (applied on device).
STREAMED_PREPROCESSING = ('standardize', 'scale', 'none')
MAX_DATA_WORKERS = 1024


def default_config() -> ml_collections.ConfigDict:
  """Every hyperparameter nin-jax reads, with its default, named once."""
  c = ml_collections.ConfigDict()
  c.preset = 'cifar10'            # models.PRESETS key: the architecture.
  # Data: 'npz:PATH' (Keras layout), 'tfds:NAME' or 'sklearn:digits'.
  c.dataset = 'tfds:cifar10'
  c.data_dir = ''                 # TFDS data_dir ('' = TFDS default).
  c.cache_dir = ''                # ZCA statistics cache ('' = ~/.cache/nin_jax).
  c.preprocessing = 'scale'       # One of PREPROCESSING.
  c.validation_split = False      # Hold out the paper's validation set.
  c.use_extra_split = False       # SVHN: train on train + extra (the paper).
  c.max_train_examples = 0        # >0: train on the first N examples only.
  c.augment = False               # Random translation (+ flip) on device.
  c.translate_pixels = 4
  c.flip = True                   # Horizontal flip (off for digits).
  # Streamed datasets (ImageNet) only: side of the square crops fed to the
  # model (0 = the preset's, 224 for 'imagenet'), and the threads decoding
  # JPEGs (0 = os.cpu_count()).
  c.image_size = 0
  c.data_workers = 0

  c.model = ml_collections.ConfigDict()
  c.model.head = 'gap'            # 'gap' (paper) or 'fc' (Table 5 ablation).
  c.model.dropout_rate = 0.5      # Between mlpconv blocks.
  c.model.head_dropout_rate = 0.0  # Before the fc head.
  # 'modern' (He) with BatchNorm trains from any start; 'faithful' (the
  # author's Gaussian init, no BatchNorm) can stall at ln(classes) for
  # thousands of steps, so only the configs that reproduce it choose it.
  c.model.weight_init = 'modern'  # Or 'faithful' (models.PRESETS' stds).
  c.model.batch_norm = True
  c.model.second_pool = ''        # '' = preset's; 'max' or 'avg'.
  c.model.final_relu = True       # ReLU on the class maps, as in Caffe.
  # Convolutions: 'auto' (oneDNN on the CPU backend where the `cpu` extra is
  # installed, see nin_jax/conv_select.py; XLA elsewhere), 'xla' or 'onednn'.
  c.model.conv_impl = 'auto'
  c.dtype = 'float32'             # Compute dtype; params stay float32.
  # CPU-only runs: split each batch over at most this many virtual CPU devices
  # (0 = automatic, up to 8; 1 = off). See README "Speed".
  c.cpu_devices = 0

  c.batch_size = 128              # Global, over all devices and processes.
  c.eval_batch_size = 500
  c.num_epochs = 10.0
  c.num_train_steps = -1          # -1: derived from num_epochs.

  c.optimizer = 'sgd'
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.weight_decay = 1e-4           # Weights only, never biases (as Caffe).
  c.bias_lr_mult = 2.0            # Caffe's lr_mult for biases.
  c.last_layer_lr_mult = 0.1      # Caffe's lr_mult for the class-map layer.
  c.schedule = 'plateau'
  c.warmup_epochs = 0.0
  c.lr_boundaries_epochs = ()     # 'step': epochs at which lr *= lr_decay.
  c.lr_decay = 0.1
  c.plateau_patience_epochs = 5   # 'plateau': epochs without train-accuracy gain.
  c.plateau_max_reductions = 2    # The paper divided by 10 twice.

  c.seed = 0
  c.log_every_steps = 50
  c.eval_every_steps = 0          # 0: once per epoch.
  c.checkpoint_every_steps = 0    # 0: once per epoch.
  c.keep_checkpoints = 3
  c.skip_nonfinite_steps = False  # True: skip a NaN/Inf step instead of stopping.
  # >0: a jax.profiler trace of this many steps (after the first, compiling
  # one) into WORKDIR/profile, for TensorBoard or Perfetto.
  c.profile_steps = 0
  return c


def streamed_image_size(c: ml_collections.ConfigDict) -> int:
  """Side of a streamed dataset's square crops: image_size, else the preset's."""
  return c.image_size or models.PRESETS[c.preset].image_size


def _check(ok: bool, field: str, value, expected: str) -> None:
  if not ok:
    raise ConfigError(f'config.{field}={value!r}: {expected}.')


def field_names(config: Any, prefix: str = '', groups: bool = True
                ) -> list[str]:
  """Every dotted field of a ConfigDict, nested ones included (and the
  groups holding them, unless `groups` is False)."""
  names = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      names += [prefix + key] if groups else []
      names += field_names(value, f'{prefix}{key}.', groups)
    else:
      names.append(prefix + key)
  return names


def nearest_names(name: str, fields: Sequence[str], n: int = 3) -> list[str]:
  """The fields spelt most like `name` (whole dotted names and last parts)."""
  close = difflib.get_close_matches(name, fields, n=n, cutoff=0.6)
  last = name.rsplit('.', 1)[-1]
  by_last = [f for f in fields
             if difflib.get_close_matches(last, [f.rsplit('.', 1)[-1]],
                                          cutoff=0.75)]
  return list(dict.fromkeys(close + by_last))[:n]


def _type_name(value) -> str:
  return 'a tuple of numbers' if isinstance(value, tuple) else (
      f'a {type(value).__name__}')


def _type_fits(value, default) -> bool:
  """Whether `value` can stand where the default config has `default`."""
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(default, tuple):
    return isinstance(value, (tuple, list)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool)
        for v in value)
  return isinstance(value, type(default))


def _numbers(value) -> list:
  """The numbers in a scalar or tuple field (none for str and bool)."""
  values = value if isinstance(value, (tuple, list)) else [value]
  return [v for v in values
          if isinstance(v, (int, float)) and not isinstance(v, bool)]


def check_fields(c: ml_collections.ConfigDict,
                 default: Optional[ml_collections.ConfigDict] = None,
                 prefix: str = '') -> None:
  """Raises ConfigError for a field `default_config()` lacks (naming the
  nearest real ones) or a value of the wrong type."""
  default = default_config() if default is None else default
  for key, value in c.items():
    name = prefix + key
    if key not in default:
      near = nearest_names(key, list(default.keys()))
      hint = (f'did you mean {", ".join(prefix + n for n in near)}?' if near
              else 'see default_config() in nin_jax/config_lib.py.')
      raise ConfigError(f'config.{name}: no such field; {hint}')
    expected = default[key]
    if isinstance(expected, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(f'config.{name}={value!r}: must be a group of '
                          f'fields ({", ".join(expected.keys())}).')
      check_fields(value, expected, f'{name}.')
    elif not _type_fits(value, expected):
      raise ConfigError(f'config.{name}={value!r}: must be '
                        f'{_type_name(expected)} (default {expected!r}).')
    elif not all(math.isfinite(v) for v in _numbers(value)):
      raise ConfigError(f'config.{name}={value!r}: must be finite.')
  missing = [k for k in default.keys() if k not in c]
  if missing:
    raise ConfigError(f'config.{prefix}{missing[0]} is missing; start the '
                      'config from config_lib.default_config().')


def validate_config(c: ml_collections.ConfigDict,
                    num_devices: Optional[int] = None) -> None:
  """Raises ConfigError naming the first invalid field of `c`.

  `num_devices`: the global device count the batch is split over.
  """
  check_fields(c)
  _check(c.preset in models.PRESETS, 'preset', c.preset,
         f'must be one of {sorted(models.PRESETS)}')
  datasets.lookup(c.dataset)
  _check(c.preprocessing in PREPROCESSING, 'preprocessing', c.preprocessing,
         f'must be one of {PREPROCESSING}')
  _check(c.model.head in models.HEADS, 'model.head', c.model.head,
         f'must be one of {models.HEADS}')
  _check(c.model.weight_init in models.INITS, 'model.weight_init',
         c.model.weight_init, f'must be one of {models.INITS}')
  _check(c.model.second_pool in ('', 'max', 'avg'), 'model.second_pool',
         c.model.second_pool, "must be '', 'max' or 'avg'")
  _check(c.model.get('conv_impl', 'xla') in conv_select.IMPLS,
         'model.conv_impl', c.model.get('conv_impl'),
         f'must be one of {conv_select.IMPLS}')
  for field in ('dropout_rate', 'head_dropout_rate'):
    rate = c.model[field]
    _check(0.0 <= rate < 1.0, f'model.{field}', rate, 'must be in [0, 1)')
  _check(c.dtype in DTYPES, 'dtype', c.dtype, f'must be one of {DTYPES}')
  for field in ('batch_size', 'eval_batch_size', 'log_every_steps',
                'keep_checkpoints'):
    _check(isinstance(c[field], int) and c[field] > 0, field, c[field],
           'must be a positive integer')
  for field in ('eval_every_steps', 'checkpoint_every_steps', 'cpu_devices',
                'max_train_examples', 'profile_steps'):
    _check(isinstance(c[field], int) and c[field] >= 0, field, c[field],
           'must be a non-negative integer (0 = default)')
  _check(c.learning_rate > 0 and math.isfinite(c.learning_rate),
         'learning_rate', c.learning_rate, 'must be a positive number')
  _check(c.weight_decay >= 0, 'weight_decay', c.weight_decay,
         'must be >= 0')
  _check(0 <= c.momentum < 1, 'momentum', c.momentum, 'must be in [0, 1)')
  for field in ('bias_lr_mult', 'last_layer_lr_mult'):
    _check(c[field] >= 0, field, c[field], 'must be >= 0')
  _check(c.optimizer in OPTIMIZERS, 'optimizer', c.optimizer,
         f'must be one of {OPTIMIZERS}')
  _check(c.schedule in SCHEDULES, 'schedule', c.schedule,
         f'must be one of {SCHEDULES}')
  _check(0 < c.lr_decay <= 1, 'lr_decay', c.lr_decay, 'must be in (0, 1]')
  _check(c.warmup_epochs >= 0, 'warmup_epochs', c.warmup_epochs,
         'must be >= 0')
  _check(all(b > 0 for b in c.lr_boundaries_epochs), 'lr_boundaries_epochs',
         c.lr_boundaries_epochs, 'must be positive epochs')
  _check(c.plateau_patience_epochs > 0, 'plateau_patience_epochs',
         c.plateau_patience_epochs, 'must be positive')
  _check(c.plateau_max_reductions >= 0, 'plateau_max_reductions',
         c.plateau_max_reductions, 'must be >= 0')
  if c.num_train_steps == -1:
    _check(c.num_epochs > 0, 'num_epochs', c.num_epochs,
           'must be positive (or set num_train_steps)')
  else:
    _check(isinstance(c.num_train_steps, int) and c.num_train_steps > 0,
           'num_train_steps', c.num_train_steps,
           'must be a positive integer, or -1 to use num_epochs')
  _check(c.translate_pixels >= 0, 'translate_pixels', c.translate_pixels,
         'must be >= 0')
  _check(0 <= c.seed < 2**31, 'seed', c.seed, 'must be in [0, 2**31)')
  _check_streamed(c)
  if num_devices is not None:
    for field in ('batch_size', 'eval_batch_size'):
      _check(c[field] % num_devices == 0, field, c[field],
             f'must be divisible by the {num_devices} devices (e.g. '
             f'{max(1, c[field] // num_devices) * num_devices})')


def _check_streamed(c: ml_collections.ConfigDict) -> None:
  """The fields that only streamed datasets use, or that they cannot honour."""
  for field in ('image_size', 'data_workers'):
    _check(isinstance(c[field], int) and c[field] >= 0, field, c[field],
           'must be a non-negative integer (0 = default)')
  _check(c.data_workers <= MAX_DATA_WORKERS, 'data_workers', c.data_workers,
         f'must be at most {MAX_DATA_WORKERS} threads (0 = one per core)')
  if not datasets.lookup(c.dataset).streamed:
    _check(c.image_size == 0, 'image_size', c.image_size,
           f'only streamed datasets '
           f'({["tfds:" + n for n in datasets.STREAMED_TFDS]}) '
           f'are cropped to a size; {c.dataset} keeps its own, so set it to 0')
    return
  _check(c.preprocessing in STREAMED_PREPROCESSING, 'preprocessing',
         c.preprocessing,
         f'{c.dataset} is streamed and normalized pixel by pixel on device, '
         f'so it needs one of {STREAMED_PREPROCESSING} (standardize: the '
         f'fixed ImageNet mean and std); {c.preprocessing} needs statistics '
         f'of the whole decoded training set')
  _check(not c.validation_split, 'validation_split', c.validation_split,
         f"{c.dataset} already evaluates on its held-out 'validation' split "
         f'(its test labels are not public); set it to False')


def check_conv_impl(c: ml_collections.ConfigDict, backend: str) -> None:
  """Raises ConfigError if config.model.conv_impl='onednn' cannot be honoured
  on `backend` (jax.default_backend()), before anything is compiled."""
  if c.model.conv_impl != 'onednn':
    return
  fix = ("use config.model.conv_impl='auto' (oneDNN where it works, XLA "
         "elsewhere) or 'xla'")
  if backend != 'cpu':
    raise ConfigError(f"config.model.conv_impl='onednn': the oneDNN kernels "
                      f'run on the CPU backend only and this run is on '
                      f'{backend}; {fix}.')
  reason = conv_select.onednn_unavailable_reason()
  if reason is not None:
    raise ConfigError(f"config.model.conv_impl='onednn': the oneDNN kernels "
                      f'are unavailable: {reason.splitlines()[0]}; {fix}.')


def check_image_size(c: ml_collections.ConfigDict, height: int, width: int,
                     channels: int) -> None:
  """Raises ConfigError if the preset cannot pool an input of this size down,
  or the translation would shift it out of the frame."""
  del channels
  streamed = datasets.lookup(c.dataset).streamed
  if c.augment and not streamed:
    _check(c.translate_pixels < min(height, width), 'translate_pixels',
           c.translate_pixels,
           f'must be smaller than the {height}x{width} images it shifts')
  blocks = models.PRESETS[c.preset].blocks
  for size in (height, width):
    if models.output_size(blocks, size) < 1:
      fix = ('raise config.image_size' if streamed else
             'pick a preset made for this dataset')
      raise ConfigError(
          f'config.preset={c.preset!r} cannot take {height}x{width} images '
          f'(its convolutions and pools need at least '
          f'{_min_input_size(blocks)} pixels); {fix}.')


def check_batch_size(c: ml_collections.ConfigDict,
                     num_train_examples: int) -> None:
  """Raises ConfigError if a training batch is larger than the training set."""
  _check(c.batch_size <= num_train_examples, 'batch_size', c.batch_size,
         f'is larger than the {num_train_examples} training examples of '
         f'{c.dataset}; use at most {num_train_examples}')


def check_schedule_length(c: ml_collections.ConfigDict,
                          steps_per_epoch: int) -> None:
  """Raises ConfigError if the warm-up is longer than a step count can be."""
  steps = c.warmup_epochs * steps_per_epoch
  _check(steps < 2**31, 'warmup_epochs', c.warmup_epochs,
         f'is {steps:.3g} steps ({steps_per_epoch} per epoch), more than '
         'the 2**31 a step counter holds')


def _min_input_size(blocks) -> int:
  size = 1
  while models.output_size(blocks, size) < 1:
    size += 1
  return size


def check_workdir(workdir: str) -> None:
  """Raises ConfigError if `workdir` (a local path) cannot be created or
  written; cloud_storage.StorageError if a remote one is missing or refused."""
  if '://' in workdir:
    from nin_jax import cloud_storage  # pylint: disable=g-import-not-at-top
    cloud_storage.check_workdir(workdir, write=True)
    return
  path = os.path.abspath(workdir)
  probe = path
  while not os.path.exists(probe):
    parent = os.path.dirname(probe)
    if parent == probe:
      break
    probe = parent
  if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
    raise ConfigError(f'--workdir={workdir!r} is not writable ({probe} is '
                      f'not a writable directory); choose another workdir.')


def load_config_file(path: str, *args) -> ml_collections.ConfigDict:
  """`get_config(*args)` of the config file at `path`."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  name = os.path.basename(path).removesuffix('.py')
  spec = importlib.util.spec_from_file_location(f'nin_jax_config_{name}',
                                                os.path.abspath(path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def sibling_config(this_file: str, name: str,
                   *args) -> ml_collections.ConfigDict:
  """`get_config(*args)` of the config file `name` beside `this_file`.

  Lets configs/cifar10_aug.py start from configs/cifar10.py without relying
  on the working directory being on sys.path.
  """
  return load_config_file(
      os.path.join(os.path.dirname(os.path.abspath(this_file)), name), *args)
