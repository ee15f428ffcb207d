"""A trained model read back from its workdir: evaluated, run on image
files, exported.

The library of the commands that use a trained model: evaluate.py (metrics
on a split), predict.py (image files) and export.py (a jax.export artifact).
A workdir holds config.json (the architecture), preprocessing.json/.npz
(input_spec.py) and orbax checkpoints; nothing else, no training data, is
needed to predict or export.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
from etils import epath
from PIL import Image

from nin_jax import batching
from nin_jax import checkpoints
from nin_jax import cloud_storage
from nin_jax import config_lib
from nin_jax import conv_select
from nin_jax import datasets
from nin_jax import input_pipeline
from nin_jax import input_spec
from nin_jax import model_factory
from nin_jax import models
from nin_jax import preprocessing
from nin_jax import streaming
from nin_jax import train
from nin_jax.errors import DataError

EXPORT_PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')
PREDICT_BATCH = 32  # Images per compiled call (the last batch is padded).
# Where an imported model came from (nin_jax.caffe_import writes it).
SOURCE_FILE = 'source.json'


class WorkdirError(config_lib.ConfigError):
  """A workdir without what the command needs (config, checkpoint, step)."""


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """A model restored from a workdir: its `config`, its `inputs` (input_spec), the flax
  `model` and its `variables` ({'params', 'batch_stats'}, NumPy) at `step`."""
  config: ml_collections.ConfigDict
  inputs: input_spec.InputSpec
  model: models.NiN
  variables: dict[str, Any]
  step: int


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """WORKDIR/config.json over the defaults (fields it lacks keep theirs)."""
  cloud_storage.check_workdir(workdir, write=False)
  path = epath.Path(workdir) / 'config.json'
  if not path.exists():
    raise WorkdirError(f'--workdir={workdir} holds no config.json: not a '
                       f'nin-jax workdir (python -m nin_jax.main or '
                       f'nin_jax.caffe_import write one).')
  c = config_lib.default_config()
  c.update(json.loads(path.read_text()))
  return c


def read_variables(workdir: str, step: Optional[int] = None
                   ) -> tuple[int, dict[str, Any]]:
  """(step, {'params', 'batch_stats'}) of the newest complete checkpoint, or
  of `step`, as NumPy arrays (plain orbax: any device count wrote it)."""
  directory = checkpoints.checkpoint_dir(workdir)
  steps = checkpoints.checkpoint_steps(workdir)
  if not steps:
    raise WorkdirError(f'--workdir={workdir} holds no complete checkpoint '
                       f'in {directory}.')
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise WorkdirError(f'--step={step}: {directory} has no checkpoint at '
                       f'that step; it has steps {steps}.')
  return step, checkpoints.read_weights(workdir, step)


def load(workdir: str, step: Optional[int] = None) -> TrainedModel:
  """The model of `workdir` at its newest checkpoint (or `step`)."""
  c = read_config(workdir)
  inputs = input_spec.load(workdir)
  step, variables = read_variables(workdir, step)
  return TrainedModel(c, inputs, model_factory.build_model(c.model),
                      variables, step)


def probabilities_fn(trained: TrainedModel, conv_impl: str = 'xla'
                     ) -> Callable[[Any, jax.Array], jax.Array]:
  """`fn(variables, images)`: class probabilities [batch, classes] of images
  [batch, height, width, channels] in the dataset's pixel units (uint8, or
  float), normalized as in training (the input spec's statistics) inside, and
  averaged with the mirror image's if the run evaluated so
  (config.train.eval_flip). `conv_impl` 'xla' keeps every convolution a plain
  XLA op (portable)."""
  model = trained.model.clone(conv=conv_select.conv_module(conv_impl))
  normalize = preprocessing.normalizer(trained.inputs.fitted)
  flip = trained.config.train.eval_flip

  def fn(variables: Any, images: jax.Array) -> jax.Array:
    if not variables.get('batch_stats'):
      variables = {'params': variables['params']}
    logits = train.eval_logits(model, variables, normalize(images), flip)
    return jax.nn.softmax(logits, axis=-1)

  return fn


def load_image(path: str, inputs: input_spec.InputSpec) -> np.ndarray:
  """An image file (PNG, JPEG, anything Pillow reads; grayscale or colour, any
  size) as the model's input: float32 [height, width, channels] in the
  dataset's pixel units. It is converted to the model's channels (colour to
  grayscale by ITU-R 601 luma, grayscale to colour by copying), its central
  crop (`inputs.crop_fraction`, square or not) resized bilinearly to the
  model's size, and 8-bit values mapped onto the dataset's range (0..16 for
  scikit-learn's digits). Raises OSError (or ValueError) if unreadable."""
  height, width, channels = inputs.image_shape
  with Image.open(path) as image:
    image = image.convert('L' if channels == 1 else 'RGB')
    top, left, h, w = streaming.central_crop(
        image.height, image.width, inputs.crop_fraction, inputs.square_crop)
    image = image.resize((width, height), Image.Resampling.BILINEAR,
                         box=(left, top, left + w, top + h))
    pixels = np.asarray(image, np.float32).reshape(height, width, channels)
  return pixels * np.float32(inputs.fitted.max_value / 255.0)


# -------------------------------------------------------------- commands --

def eval_split(c: ml_collections.ConfigDict, spec: datasets.DatasetSpec,
               inputs: input_spec.InputSpec, split: str = ''
               ) -> tuple[batching.AnySplit, Optional[Callable]]:
  """(split, device normalization or None) to evaluate: in-memory splits are
  normalized on the host with the saved statistics, streamed ones on device
  and cropped as `inputs` says."""
  if not spec.streamed:
    split = split or ('validation' if c.data.validation_split else 'test')
    return input_pipeline.load_split(c.data, spec, split, inputs.fitted,
                                     inputs.num_classes), None
  dataset = input_pipeline.load_streamed(c.data, spec, inputs.num_classes,
                                         inputs.image_shape[0])
  streams = {dataset.eval_name: dataset.eval,
             'train': dataset.train}
  if (split or dataset.eval_name) not in streams:
    raise DataError(
        f'{c.data.dataset} has splits {sorted(streams)} to evaluate, not '
        f'{split!r}.')
  stream = dataclasses.replace(
      streams[split or dataset.eval_name], augment=False,
      crop_fraction=inputs.crop_fraction, square_crop=inputs.square_crop)
  return stream, preprocessing.normalizer(inputs.fitted)


def evaluate(workdir: str, step: Optional[int] = None, split: str = '',
             flip: Optional[bool] = None,
             **data_overrides: Any) -> dict[str, Any]:
  """Metrics of `workdir`'s checkpoint (newest, or `step`) on `split` (''
  the run's evaluation split), as the training run computes them: the same
  compiled eval step and batches, the saved statistics; and 'step'. `flip`:
  average with the mirror images or not (None: as the run did,
  config.train.eval_flip). `data_overrides` replace config.data fields
  (dataset, data_dir). One process, on all of its devices."""
  trained = load(workdir, step)
  c = trained.config
  c.data.update(data_overrides)
  if flip is not None:
    c.train.eval_flip = bool(flip)
  spec = datasets.lookup(c.data.dataset)
  config_lib.check_eval_flip(c, spec)
  config_lib.check_num_classes(c, spec)
  data, normalize_fn = eval_split(c, spec, trained.inputs, split)
  mesh = train.create_mesh()
  replicated = NamedSharding(mesh, P())
  eval_fn = train.compile_eval_step(trained.model, mesh, replicated,
                                    normalize_fn, c.train.eval_flip)
  state = jax.device_put(train.TrainState(
      step=trained.step, params=trained.variables['params'],
      batch_stats=trained.variables['batch_stats'], opt_state=None,
      rng=None), replicated)
  devices = mesh.devices.size
  batch_size = math.ceil(c.train.eval_batch_size / devices) * devices
  metrics = train.evaluate(eval_fn, state, batching.eval_batches(
      data, batch_size, NamedSharding(mesh, P(train.DATA_AXIS))))
  source = read_source(workdir)
  return {**metrics, 'step': trained.step,
          **({'source': source} if source else {})}


def read_source(workdir: str) -> Optional[str]:
  """'FILE (net NAME)' for a workdir nin_jax.caffe_import wrote, else None:
  what its step-0 checkpoint holds."""
  path = epath.Path(workdir) / SOURCE_FILE
  if not path.exists():
    return None
  source = json.loads(path.read_text())
  return f'{source["caffemodel"]} (net {source["net"] or "unnamed"})'


def classify(trained: TrainedModel, paths: Sequence[str],
             top_k: int = 5) -> Iterator[dict[str, Any]]:
  """For each image file, in order: {'path', 'top_k': [{'class', 'name',
  'probability'}, ...]} (most probable first), or {'path', 'error'} for a
  file that cannot be read as an image."""
  fn = jax.jit(probabilities_fn(trained))
  top_k = min(top_k, trained.inputs.num_classes)
  for start in range(0, len(paths), PREDICT_BATCH):
    chunk = paths[start:start + PREDICT_BATCH]
    images, errors = {}, {}
    for path in chunk:
      try:
        images[path] = load_image(path, trained.inputs)
      except (OSError, ValueError) as e:
        errors[path] = f'{path}: cannot be read as an image ({e})'
    batch = np.zeros((PREDICT_BATCH, *trained.inputs.image_shape), np.float32)
    for row, image in enumerate(images.values()):
      batch[row] = image
    rows = (dict(zip(images, np.asarray(fn(trained.variables, batch))))
            if images else {})
    for path in chunk:
      if path in errors:
        yield {'path': path, 'error': errors[path]}
      else:
        order = np.argsort(-rows[path], kind='stable')[:top_k]
        yield {'path': path, 'top_k': [
            {'class': int(i), 'name': trained.inputs.class_names[i],
             'probability': float(rows[path][i])} for i in order]}


def export(trained: TrainedModel,
           platforms: Sequence[str] = ('cpu', 'cuda', 'tpu')
           ) -> jax.export.Exported:
  """`trained`'s class probabilities [batch, classes] of uint8 images
  [batch, height, width, channels] as the dataset stores them, any batch
  size, preprocessing and weights inside, XLA's convolutions only, lowered
  for `platforms` (of EXPORT_PLATFORMS)."""
  unknown = sorted(set(platforms) - set(EXPORT_PLATFORMS))
  if unknown or not platforms:
    raise config_lib.ConfigError(f'--platforms={",".join(platforms)}: '
                                 f'choose from {EXPORT_PLATFORMS}.')
  fn = functools.partial(probabilities_fn(trained, conv_impl='xla'),
                         trained.variables)
  batch, = jax.export.symbolic_shape('batch')
  images = jax.ShapeDtypeStruct((batch, *trained.inputs.image_shape),
                                jnp.uint8)
  return jax.export.export(jax.jit(fn), platforms=tuple(platforms))(images)
