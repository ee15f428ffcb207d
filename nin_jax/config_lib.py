"""The experiment config: its layout, defaults and the checks across subtrees.

A config has five subtrees, each read (and validated) by the module that owns
it: `data` (input_pipeline), `model` (model_factory, conv_select), `optim`
(optimizer), `train` (train; its checks in validation) and `runtime`
(runtime). Every config in `configs/` starts from `default_config()` and
changes a few fields. `check_fields` checks the layout and types, the
`check_*` functions below the checks that span subtrees;
`validation.validate_config` runs them all, before anything is compiled,
loaded or written, and each error names the offending field.
"""

from __future__ import annotations

import difflib
import math
import os
from typing import Any, Optional, Sequence

import ml_collections

from nin_jax import datasets
from nin_jax import models
from nin_jax.errors import ConfigError, check as _check

SUBTREES = ('data', 'model', 'optim', 'train', 'runtime')


def default_config() -> ml_collections.ConfigDict:
  """Every hyperparameter nin-jax reads, with its default, named once.

  The default model trains from any start (He init + BatchNorm); the author's
  model ('faithful' init, no BatchNorm) is chosen by the configs that
  reproduce it.
  """
  c = ml_collections.ConfigDict()
  c.data = d = ml_collections.ConfigDict()
  # 'npz:PATH' (Keras layout), 'tfds:NAME' or 'sklearn:digits'.
  d.dataset = 'tfds:cifar10'
  d.data_dir = ''                 # TFDS data_dir ('' = TFDS default).
  d.cache_dir = ''                # ZCA statistics cache ('' = $XDG_CACHE_HOME/nin_jax or ~/.cache/nin_jax).
  d.preprocessing = 'scale'       # One of preprocessing.METHODS.
  d.validation_split = False      # Hold out the paper's validation set.
  d.use_extra_split = False       # SVHN: train on train + extra (the paper).
  d.max_train_examples = 0        # >0: train on the first N examples only.
  d.augment = False               # Random translation (+ flip) on device.
  d.translate_pixels = 4
  d.flip = True                   # Horizontal flip (off for digits).
  # Streamed datasets (ImageNet) only: side of the square crops fed to the
  # model (0 = the preset's, 224 for 'imagenet'), and the threads decoding
  # JPEGs (0 = os.cpu_count()).
  d.image_size = 0
  d.data_workers = 0

  c.model = m = ml_collections.ConfigDict()
  m.preset = 'cifar10'            # models.PRESETS key: the architecture.
  m.head = 'gap'                  # 'gap' (paper) or 'fc' (the head ablation).
  m.dropout_rate = 0.5            # Between mlpconv blocks.
  m.head_dropout_rate = 0.0       # Before the fc head.
  # 'modern' (He) with BatchNorm trains from any start; 'faithful' (the
  # author's Gaussian init, no BatchNorm) can stall at ln(classes) for
  # thousands of steps, so only the configs that reproduce it choose it.
  m.weight_init = 'modern'        # Or 'faithful' (models.PRESETS' stds).
  m.batch_norm = True
  m.second_pool = ''              # '' = preset's; 'max' or 'avg'.
  m.final_relu = True             # ReLU on the class maps, as in Caffe.
  # Convolutions: 'auto' (oneDNN on the CPU backend where the `cpu` extra is
  # installed, see nin_jax/conv_select.py; XLA elsewhere), 'xla' or 'onednn'.
  m.conv_impl = 'auto'
  m.dtype = 'float32'             # Compute dtype; params stay float32.

  c.optim = o = ml_collections.ConfigDict()
  o.optimizer = 'sgd'             # Or 'nesterov'.
  o.learning_rate = 0.1
  o.momentum = 0.9
  o.weight_decay = 1e-4           # Weights only, never biases (as Caffe).
  o.bias_lr_mult = 2.0            # Caffe's lr_mult for biases.
  o.last_layer_lr_mult = 0.1      # Caffe's lr_mult for the class-map layer.
  o.schedule = 'plateau'          # One of optimizer.SCHEDULES.
  o.warmup_epochs = 0.0
  o.lr_boundaries_epochs = ()     # 'step': epochs at which lr *= lr_decay.
  o.lr_decay = 0.1
  o.plateau_patience_epochs = 5   # 'plateau': epochs without train-accuracy gain.
  o.plateau_max_reductions = 2    # The paper divided by 10 twice.

  c.train = t = ml_collections.ConfigDict()
  t.batch_size = 128              # Global, over all devices and processes.
  t.eval_batch_size = 500
  t.num_epochs = 10.0
  t.num_train_steps = -1          # -1: derived from num_epochs.
  t.seed = 0
  t.label_smoothing = 0.0         # Train loss against (1-a) one-hot + a/classes.
  t.eval_flip = False             # Evaluate on the mean logits of image and mirror.
  t.log_every_steps = 50
  t.eval_every_steps = 0          # 0: once per epoch.
  t.checkpoint_every_steps = 0    # 0: once per epoch.
  t.keep_checkpoints = 3
  t.skip_nonfinite_steps = False  # True: skip a NaN/Inf step instead of stopping.
  # 'WORKDIR' or 'WORKDIR:STEP': a new run starts (step 0, fresh optimizer)
  # from the parameters and BatchNorm statistics of that workdir's newest (or
  # STEP's) checkpoint: another run or an imported model. Unused on resume.
  t.init_from = ''
  # >0: a jax.profiler trace of this many steps (after the first, compiling
  # one) into WORKDIR/profile, for TensorBoard or Perfetto.
  t.profile_steps = 0

  c.runtime = r = ml_collections.ConfigDict()
  # CPU-only runs: split each batch over at most this many virtual CPU devices
  # (0 = automatic, up to 8; 1 = off). See README "Speed".
  r.cpu_devices = 0
  return c


def streamed_image_size(c: ml_collections.ConfigDict) -> int:
  """Side of a streamed dataset's square crops: data.image_size, else the
  preset's."""
  return c.data.image_size or models.PRESETS[c.model.preset].image_size


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
  """The fields spelt most like `name` (whole dotted names and last parts);
  only the fields whose last part is `name`'s, where there are such (a field
  given in the wrong group or none)."""
  by_last_part = {}
  for field in fields:
    by_last_part.setdefault(field.rsplit('.', 1)[-1], []).append(field)
  same = by_last_part.get(name.rsplit('.', 1)[-1], [])
  if same:
    return same[:n]
  close = difflib.get_close_matches(name, fields, n=n, cutoff=0.6)
  last = difflib.get_close_matches(name.rsplit('.', 1)[-1], by_last_part,
                                   n=n, cutoff=0.75)
  return list(dict.fromkeys(
      close + [f for part in last for f in by_last_part[part]]))[:n]


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
      near = [f for f in field_names(default_config(), groups=False)
              if f.rsplit('.', 1)[-1] == key] or [
                  prefix + n for n in nearest_names(key, list(default.keys()))]
      hint = (f'did you mean {", ".join("config." + n for n in near)}?'
              if near else 'see default_config() in nin_jax/config_lib.py.')
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


def check_devices(c: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises ConfigError unless both batch sizes split evenly over the
  `num_devices` (global) devices."""
  for field in ('batch_size', 'eval_batch_size'):
    value = c.train[field]
    _check(value % num_devices == 0, f'train.{field}', value,
           f'must be divisible by the {num_devices} devices (e.g. '
           f'{max(1, value // num_devices) * num_devices})')


def check_image_size(c: ml_collections.ConfigDict,
                     spec: datasets.DatasetSpec, height: int, width: int,
                     channels: int) -> None:
  """Raises ConfigError if the preset cannot pool an input of this size down,
  or the translation would shift it out of the frame."""
  del channels
  streamed = spec.streamed
  if c.data.augment and not streamed:
    _check(c.data.translate_pixels < min(height, width),
           'data.translate_pixels',
           c.data.translate_pixels,
           f'must be smaller than the {height}x{width} images it shifts')
  blocks = models.PRESETS[c.model.preset].blocks
  for size in (height, width):
    if models.output_size(blocks, size) < 1:
      fix = ('raise config.data.image_size' if streamed else
             'pick a preset made for this dataset')
      raise ConfigError(
          f'config.model.preset={c.model.preset!r} cannot take '
          f'{height}x{width} images '
          f'(its convolutions and pools need at least '
          f'{_min_input_size(blocks)} pixels); {fix}.')


def check_eval_flip(c: ml_collections.ConfigDict,
                    spec: datasets.DatasetSpec) -> None:
  """Raises ConfigError if test-time flips are asked for on a dataset whose
  classes a mirror image changes (digits)."""
  _check(not c.train.eval_flip or spec.flip,
         'train.eval_flip', c.train.eval_flip,
         f'{c.data.dataset} is a digit dataset, whose mirror images are not '
         'its classes; set it False')


def check_num_classes(c: ml_collections.ConfigDict,
                      spec: datasets.DatasetSpec) -> None:
  """Raises ConfigError if the dataset's class count is known and is not the
  number of class maps the preset makes (caught before any data is read)."""
  have = spec.num_classes
  makes = models.PRESETS[c.model.preset].num_classes
  if have is not None and have != makes:
    fits = sorted(name for name, preset in models.PRESETS.items()
                  if preset.num_classes == have)
    raise ConfigError(
        f'config.model.preset={c.model.preset!r} makes {makes} class maps, '
        f'but config.data.dataset={c.data.dataset!r} has {have} classes; '
        f'use a preset made for it ({", ".join(map(repr, fits))}).')


def check_batch_size(c: ml_collections.ConfigDict,
                     num_train_examples: int) -> None:
  """Raises ConfigError if a training batch is larger than the training set."""
  _check(c.train.batch_size <= num_train_examples, 'train.batch_size',
         c.train.batch_size,
         f'is larger than the {num_train_examples} training examples of '
         f'{c.data.dataset}; use at most {num_train_examples}')


def check_schedule_length(c: ml_collections.ConfigDict,
                          steps_per_epoch: int) -> None:
  """Raises ConfigError if the warm-up is longer than a step count can be."""
  steps = c.optim.warmup_epochs * steps_per_epoch
  _check(steps < 2**31, 'optim.warmup_epochs', c.optim.warmup_epochs,
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
