"""The Caffe model zoo's NiN as a nin-jax workdir (nin_jax.caffe_import).

A zoo `.caffemodel` (read by caffe_model.py) must hold the preset's
convolution, ReLU and pooling layers in order (kernel shapes, strides,
padding, pooling kinds); `match_params` names the first layer that differs.
Caffe's weights [out, in, kh, kw] become Flax's [kh, kw, in, out]. The
workdir gets a checkpoint (step 0: parameters only, no optimizer state),
config.json and the input conventions the zoo model was trained with, so
nin_jax.evaluate, predict and export use it as they are:

- imagenet (gist mavenlin/d802a5849de39225bcc6): pixels 0-255 in BGR order
  minus the mean image (Caffe's imagenet_mean.binaryproto, its central
  224x224) or a mean pixel (B, G, R; default 104, 117, 123); an image is
  squashed to 256x256 and its central 224x224 taken, Caffe's test crop.
- cifar10 (gist mavenlin/e56253735ef32c3c296d): GCN (scale 55) + ZCA
  whitening fitted on a CIFAR-10 training split, the pylearn2 pipeline the
  zoo model was trained on; RGB.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from typing import Any, Optional, Sequence

from absl import logging
import ml_collections
import numpy as np
from etils import epath

from nin_jax import caffe_model
from nin_jax import checkpoints
from nin_jax import config_lib
from nin_jax import datasets
from nin_jax import inference
from nin_jax import input_spec
from nin_jax import models
from nin_jax import preprocessing
from nin_jax import sources
from nin_jax import train
from nin_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class ZooModel:
  """A Caffe model zoo NiN: the preset it fills, its second pooling, the
  dataset it is evaluated on, its batch sizes, and where the weights come
  from (the gist; the file's sha256 where it is known here, '' if not)."""
  preset: str
  second_pool: str
  dataset: str
  batch_size: int
  eval_batch_size: int
  url: str
  sha256: str


ZOO = {
    'imagenet': ZooModel(
        'imagenet', '', 'tfds:imagenet2012', 64, 250,
        'https://gist.github.com/mavenlin/d802a5849de39225bcc6', ''),
    'cifar10': ZooModel(
        'cifar10', 'avg', 'tfds:cifar10', 128, 500,
        'https://gist.github.com/mavenlin/e56253735ef32c3c296d',
        'd131ace82eeecbc14bfba817a99eaaef3ecf4fbfeac1d5da2bc2c3ef4d1fb3da'),
}
CAFFE_MEAN_PIXEL = (104.0, 117.0, 123.0)  # B, G, R.
CAFFE_RESIZE = 256  # ImageNet images were squashed to 256x256 ...
CAFFE_CROP = 224    # ... and tested on their central 224x224.
CAFFE_POOLS = {'max': 'MAX', 'avg': 'AVE'}
# Layers that carry no weights and do not change inference.
IGNORED_TYPES = ('Data', 'ImageData', 'Input', 'MemoryData', 'HDF5Data',
                 'DummyData', 'Dropout', 'Accuracy', 'SoftmaxWithLoss',
                 'Softmax', 'Split', 'Silence', 'Flatten')


# --------------------------------------------------------------- matching --

@dataclasses.dataclass(frozen=True)
class Expected:
  """A layer the preset expects: what it must read as (any of `accepts`,
  see `describe`) and, for a convolution, the Flax parameters it fills."""
  accepts: tuple[str, ...]
  params: Optional[tuple[str, str]] = None


def describe(layer: caffe_model.Layer) -> str:
  """The layer as the comparison sees it: its type, weight and bias shapes,
  kernel, stride, padding (and pooling method)."""
  if layer.type == 'Convolution' and layer.convolution is not None:
    conv = layer.convolution
    weights = list(layer.blobs[0].shape) if layer.blobs else None
    bias = [layer.blobs[1].size] if len(layer.blobs) > 1 else None
    return (f'Convolution weights {weights} bias {bias} stride '
            f'{list(conv.stride)} pad {list(conv.pad)} group {conv.group}')
  if layer.type == 'Pooling' and layer.pooling is not None:
    pool = layer.pooling
    if pool.global_pooling:
      return f'Pooling {pool.method} global'
    return (f'Pooling {pool.method} {list(pool.kernel)} stride '
            f'{list(pool.stride)} pad {list(pool.pad)}')
  shapes = ''.join(f' {list(b.shape)}' for b in layer.blobs)
  return f'{layer.type}{shapes}'


def _conv(out: int, inp: int, k: int, stride: int, pad: int) -> str:
  return (f'Convolution weights [{out}, {inp}, {k}, {k}] bias [{out}] stride '
          f'{[stride] * 2} pad {[pad] * 2} group 1')


def _pool(method: str, k: int, stride: int) -> str:
  return f'Pooling {method} {[k] * 2} stride {[stride] * 2} pad [0, 0]'


def expected_layers(zoo: ZooModel) -> list[Expected]:
  """The Caffe layers of the preset, in order: each convolution and its
  ReLU, the pools between blocks, the global average pool at the end."""
  spec = models.PRESETS[zoo.preset]
  model = models.create_model(zoo.preset, second_pool=zoo.second_pool or None)
  layers, channels = [], spec.channels
  for b, block in enumerate(model.blocks):
    last = b == len(model.blocks) - 1
    widths = tuple(block.features) + ((spec.num_classes,) if last else ())
    for i, width in enumerate(widths):
      k, stride, pad = ((block.kernel_size, block.stride, block.padding)
                        if i == 0 else (1, 1, 0))
      layers.append(Expected((_conv(width, channels, k, stride, pad),),
                             (f'mlpconv{b + 1}', 'conv' if i == 0 else
                              f'cccp{i}')))
      layers.append(Expected(('ReLU',)))
      channels = width
    if block.pool != 'none':
      layers.append(Expected((_pool(CAFFE_POOLS[block.pool],
                                    block.pool_window, block.pool_stride),)))
  final = models.output_size(model.blocks, spec.image_size)
  layers.append(Expected((_pool('AVE', final, 1), 'Pooling AVE global')))
  return layers


def match_params(path: str, layers: Sequence[caffe_model.Layer],
                 zoo: ZooModel) -> dict[str, Any]:
  """The Flax params of `zoo.preset` from the net's layers; raises
  CaffeFormatError naming the first layer that is not the preset's."""
  layers = [l for l in layers if l.type not in IGNORED_TYPES]
  expected = expected_layers(zoo)
  params: dict[str, Any] = {}
  for i, want in enumerate(expected):
    if i == len(layers):
      end = f'after layer {layers[-1].name!r}' if layers else 'at once'
      raise caffe_model.CaffeFormatError(
          f'{path}: the net ends {end}; preset {zoo.preset} expects '
          f'"{want.accepts[0]}" next.')
    got = describe(layers[i])
    if got not in want.accepts:
      raise caffe_model.CaffeFormatError(
          f'{path}: layer {layers[i].name!r} is "{got}" where preset '
          f'{zoo.preset} expects "{want.accepts[0]}".')
    if want.params:
      weights, bias = layers[i].blobs[:2]
      block, layer = want.params
      params.setdefault(block, {})[layer] = {
          'kernel': np.ascontiguousarray(weights.transpose(2, 3, 1, 0)),
          'bias': bias.reshape(-1)}
  if len(layers) > len(expected):
    extra = layers[len(expected)]
    raise caffe_model.CaffeFormatError(
        f'{path}: layer {extra.name!r} ("{describe(extra)}") follows the '
        f'last layer of preset {zoo.preset}.')
  return params


# ---------------------------------------------------------- preprocessing --

def imagenet_spec(mean_file: Optional[str], mean_pixel: Sequence[float],
                  names: tuple[str, ...]) -> input_spec.InputSpec:
  """Caffe's ImageNet input: BGR, 0-255, minus the central crop of the mean
  image (or the mean pixel); images squashed to 256x256, central 224x224."""
  fraction = CAFFE_CROP / CAFFE_RESIZE
  if mean_file:
    blob = caffe_model.read_blob(mean_file)
    shape = blob.shape[-3:]
    if blob.ndim < 3 or blob.size != math.prod(shape) or shape[0] != 3:
      shape = (0, 0, 0)
    image = blob.reshape(shape).transpose(1, 2, 0)  # HWC, BGR.
    height, width, _ = image.shape
    if min(height, width) < CAFFE_CROP:
      raise caffe_model.CaffeFormatError(
          f'{mean_file}: a mean image of shape {list(blob.shape)}; expected '
          f'[1, 3, H, W] with H, W >= {CAFFE_CROP}.')
    top, left = (height - CAFFE_CROP) // 2, (width - CAFFE_CROP) // 2
    mean = image[top:top + CAFFE_CROP, left:left + CAFFE_CROP]
    fraction = CAFFE_CROP / height
  else:
    mean = np.asarray(mean_pixel, np.float32)
    if mean.shape != (3,):
      raise config_lib.ConfigError(f'--mean_pixel={mean_pixel}: give three '
                                   f'values, B,G,R.')
  fitted = preprocessing.Fitted('caffe', datasets.PIXEL_MAX_VALUE,
                                {'mean': mean.astype(np.float32)})
  return input_spec.InputSpec(fitted, (CAFFE_CROP, CAFFE_CROP, 3), names,
                              crop_fraction=fraction, square_crop=False)


def cifar10_spec(c: ml_collections.ConfigDict,
                 names: Optional[tuple[str, ...]]) -> input_spec.InputSpec:
  """GCN + ZCA fitted on the training split of `c.data.dataset`, RGB."""
  spec = datasets.lookup(c.data.dataset)
  raw = sources.load_raw(c.data, spec)
  preset = models.PRESETS['cifar10']
  shape = preset.image_shape
  if raw.x_train.shape[1:] != shape:
    raise DataError(
        f'{c.data.dataset}: images of shape {raw.x_train.shape[1:]}; the '
        f'CIFAR-10 model takes {shape}.')
  fitted = preprocessing.fit(raw.x_train, 'gcn_zca', raw.max_value,
                             c.data.cache_dir or None)
  return input_spec.InputSpec(
      fitted, shape,
      names or sources.class_names(c.data, spec, preset.num_classes))


def read_class_names(path: Optional[str],
                     num_classes: int) -> Optional[tuple[str, ...]]:
  """One name per line (a leading WordNet id such as 'n01440764 ' dropped)."""
  if not path:
    return None
  lines = [l.strip() for l in epath.Path(path).read_text().splitlines()
           if l.strip()]
  if len(lines) != num_classes:
    raise config_lib.ConfigError(f'--class_names={path}: {len(lines)} names '
                                 f'for {num_classes} classes.')
  return tuple(re.sub(r'^n\d{8}\s+', '', l) for l in lines)


# ------------------------------------------------------------------ import --

def zoo_config(zoo: ZooModel, dataset: str, data_dir: str
               ) -> ml_collections.ConfigDict:
  """The config.json of an imported model: the preset as the zoo file has
  it (Caffe's init family, no BatchNorm, ReLU on the class maps)."""
  c = config_lib.default_config()
  c.model.preset = zoo.preset
  c.data.dataset = dataset
  c.data.data_dir = data_dir
  c.data.preprocessing = 'caffe' if zoo.preset == 'imagenet' else 'gcn_zca'
  if datasets.lookup(dataset).streamed:
    c.data.image_size = CAFFE_CROP
  c.model.weight_init = 'faithful'
  c.model.batch_norm = False
  c.model.second_pool = zoo.second_pool
  c.train.batch_size = zoo.batch_size
  c.train.eval_batch_size = zoo.eval_batch_size
  return c


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with epath.Path(path).open('rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def check_provenance(caffemodel: str, found: str,
                     zoo: ZooModel) -> Optional[str]:
  """A warning (logged, and returned) if `caffemodel`, whose sha256 is
  `found`, is not the zoo's file of `zoo`: not a refusal, since other trained
  weights of the same net are legitimate, but their results are not the zoo
  model's."""
  if not zoo.sha256 or found == zoo.sha256:
    return None
  message = (f'{caffemodel} has sha256 {found}, not {zoo.sha256} (the '
             f'{zoo.preset} model of {zoo.url}): importing it as weights of '
             f'the same net; results measured with the zoo file do not apply '
             f'to it.')
  logging.warning(message)
  return message


def import_caffemodel(caffemodel: str, preset: str, workdir: str,
                      mean_file: Optional[str] = None,
                      mean_pixel: Sequence[float] = CAFFE_MEAN_PIXEL,
                      class_names: Optional[str] = None,
                      dataset: Optional[str] = None,
                      data_dir: str = '') -> int:
  """Writes `caffemodel` (the zoo's `preset` model) as the workdir
  `workdir`; returns the number of parameters imported."""
  zoo = ZOO[preset]
  config_lib.check_workdir(workdir)
  if checkpoints.checkpoint_steps(workdir):
    raise config_lib.ConfigError(f'--workdir={workdir} already holds '
                                 f'checkpoints; import into a new workdir.')
  net = caffe_model.read_net(caffemodel)
  digest = file_sha256(caffemodel)
  check_provenance(caffemodel, digest, zoo)
  source = {'caffemodel': epath.Path(caffemodel).name,
            'net': caffe_model.net_name(caffemodel), 'sha256': digest,
            'url': zoo.url}
  params = match_params(caffemodel, net, zoo)
  c = zoo_config(zoo, dataset or zoo.dataset, data_dir)
  num_classes = models.PRESETS[preset].num_classes
  names = read_class_names(class_names, num_classes)
  if preset == 'imagenet':
    spec = imagenet_spec(mean_file, [float(v) for v in mean_pixel],
                         names or tuple(map(str, range(num_classes))))
  else:
    spec = cifar10_spec(c, names)
  train.write_config(c, workdir)
  input_spec.save(workdir, spec)
  (epath.Path(workdir) / inference.SOURCE_FILE).write_text(
      json.dumps(source, indent=2))
  manager = checkpoints.create_manager(workdir, keep=1, async_save=False)
  checkpoints.save(manager, 0, {'step': np.int32(0), 'params': params},
                   force=True)
  manager.wait_until_finished()
  manager.close()
  count = sum(math.prod(a.shape) for layer in params.values()
              for p in layer.values() for a in p.values())
  logging.info('Imported %s (%d parameters) as preset %s into %s.',
               caffemodel, count, preset, workdir)
  return count


