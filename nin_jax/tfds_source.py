"""Prepared TFDS datasets read through `tfds.data_source`, without TensorFlow.

`tfds.data_source` reads the ArrayRecord files of a prepared dataset with
`array_record` and decodes images with Pillow. We chose it over `tfds.load`
(tf.data), which needs TensorFlow: the tensorflow-cpu 2.21 wheel alone is a
274 MB download and 1,272 MB installed, against about 70 MB for
tensorflow-datasets, array_record and Pillow. Every split nin-jax trains on
(ImageNet aside) fits in host memory, so tf.data's streaming buys nothing here:
each split is decoded once at start (about 6,700 CIFAR-sized images/s on a
2-core CPU, experiments/input_benchmark.py) and batched from memory after that.
ImageNet does not fit: `encoded_sources` hands its splits over with the JPEGs
left encoded, for streaming.py to decode and crop batch by batch. Which splits
a dataset has comes from its registry entry (datasets.py).

Nothing here downloads: `open_builder` looks for a prepared copy in `data_dir`
and raises `DataError` at once (well under a second) when there is none,
instead of letting TFDS retry a download for minutes on an offline machine.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence

import numpy as np
from absl import logging

from nin_jax import datasets
from nin_jax.errors import DataError

READ_CHUNK = 4096


@dataclasses.dataclass(frozen=True)
class Arrays:
  """One split: images [n, height, width, channels] uint8, labels [n] int32."""
  images: np.ndarray
  labels: np.ndarray


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(
        f'config.data.dataset=tfds:...: tensorflow_datasets is not installed ({e}); '
        f"run `pip install 'nin-jax[tfds]'` or use --config.data.dataset=npz:PATH."
    ) from e
  return tfds


def not_prepared_message(name: str, data_dir: Optional[str],
                         where: str) -> str:
  """The one-line DataError text for a dataset that is not prepared."""
  return (
      f'config.data.dataset=tfds:{name}: no prepared copy in {where} (TFDS data_dir '
      f'{data_dir or "default"}), and nin-jax never downloads. Either '
      f'(1) point --config.data.data_dir=DIR at a TFDS data_dir holding a prepared '
      f'array_record copy of {name}; or (2) on a machine that has the original '
      f'archives, prepare one with `tfds build {name} --file_format='
      f'array_record --manual_dir=ARCHIVES --data_dir=DIR` (or builder.'
      f'download_and_prepare(file_format="array_record", download_config='
      f'tfds.download.DownloadConfig(manual_dir=ARCHIVES))) and copy DIR '
      f'here; or (3) use Keras-layout arrays: --config.data.dataset=npz:PATH.')


def open_builder(name: str, data_dir: Optional[str]):
  """Builder of a prepared array_record copy of `name` (or DataError)."""
  tfds = _import_tfds()
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'config.data.dataset=tfds:{name}: TFDS cannot open it in '
                    f'--config.data.data_dir={data_dir or "(default)"}: {e}') from e
  if not builder.is_prepared():
    raise DataError(not_prepared_message(name, data_dir, builder.data_dir))
  formats = {f.value for f in builder.info.available_file_formats()}
  if 'array_record' not in formats:
    raise DataError(
        f'config.data.dataset=tfds:{name}: the copy in {builder.data_dir} is '
        f'stored as {sorted(formats)}, which needs TensorFlow to read; '
        f'rebuild it with `tfds build {name} --file_format=array_record` or '
        f'use --config.data.dataset=npz:PATH.')
  return builder


def _original_order(ids: Sequence) -> Optional[np.ndarray]:
  """The order that sorts ids like b'train_00042' by number, if all are so."""
  numbers = []
  for i in ids:
    match = re.fullmatch(r'[a-z]+_(\d+)', i.decode() if isinstance(i, bytes)
                         else str(i))
    if match is None:
      return None
    numbers.append(int(match.group(1)))
  return np.argsort(np.asarray(numbers), kind='stable')


def read_split(source, name: str, split: str) -> Arrays:
  """Decodes every example of a data source into arrays, in the original
  order of the dataset when its examples carry ids like 'train_00042'."""
  n = len(source)
  images, labels, ids = [], [], []
  for start in range(0, n, READ_CHUNK):
    keys = range(start, min(n, start + READ_CHUNK))
    for example in source.__getitems__(keys):
      images.append(example['image'])
      labels.append(example['label'])
      ids.append(example.get('id'))
  if not images:
    raise DataError(f'config.data.dataset=tfds:{name}: split {split!r} is empty.')
  images = np.stack(images).astype(np.uint8, copy=False)
  labels = np.asarray(labels, np.int32)
  if images.ndim == 3:
    images = images[..., None]
  if all(i is not None for i in ids):
    order = _original_order(ids)
    if order is not None:
      images, labels = images[order], labels[order]
  return Arrays(images, labels)


def split_names(spec: datasets.DatasetSpec, with_extra: bool = False
                ) -> list[str]:
  """The splits read: 'train', the evaluation split, and the extra splits if
  `with_extra`."""
  splits = ['train', spec.eval_split]
  if with_extra:
    if not spec.extra_splits:
      raise DataError(
          f'config.data.use_extra_split=True but tfds:{spec.name} has no '
          'extra split; set it to False.')
    splits += spec.extra_splits
  return splits


def _check_splits(builder, name: str, splits: Sequence[str]) -> None:
  """Raises DataError if the prepared copy lacks one of `splits`."""
  available = set(builder.info.splits.keys())
  missing = [s for s in splits if s not in available]
  if missing and available:
    raise DataError(f'config.data.dataset=tfds:{name}: the copy in '
                    f'{builder.data_dir} lacks splits {missing} (it has '
                    f'{sorted(available)}); prepare them or use npz:PATH.')


def load_arrays(spec: datasets.DatasetSpec, data_dir: Optional[str] = None,
                splits: Optional[Sequence[str]] = None) -> dict[str, Arrays]:
  """Reads `splits` (default: 'train' and the evaluation split) of the TFDS
  dataset `spec` into memory."""
  name = spec.name
  if spec.streamed:
    raise DataError(
        f'config.data.dataset=tfds:{name} does not fit in host memory: it is '
        f'streamed batch by batch (streaming.py), never read whole.')
  builder = open_builder(name, data_dir)
  splits = list(splits or split_names(spec))
  _check_splits(builder, name, splits)
  sources = builder.as_data_source(split=splits)
  arrays = {}
  for split, source in zip(splits, sources):
    arrays[split] = read_split(source, name, split)
    logging.info('Read tfds:%s %s: %d images %s from %s', name, split,
                 len(arrays[split].labels), arrays[split].images.shape[1:],
                 builder.data_dir)
  return arrays


def label_names(name: str, data_dir: Optional[str]) -> tuple[str, ...]:
  """The class names of a prepared dataset's 'label' feature (() if none)."""
  label = open_builder(name, data_dir).info.features['label']
  return tuple(getattr(label, 'names', None) or ())


def encoded_sources(spec: datasets.DatasetSpec, data_dir: Optional[str],
                    num_classes: int) -> dict[str, Sequence[dict]]:
  """Random-access sources of the splits of `spec` (see `split_names`) whose
  examples keep their images encoded: {'image': JPEG/PNG bytes, 'label': int,
  ...}. Raises DataError if the labels need more than `num_classes` classes."""
  tfds = _import_tfds()
  name = spec.name
  builder = open_builder(name, data_dir)
  label = builder.info.features['label']
  if getattr(label, 'num_classes', 0) > num_classes:
    raise DataError(f'config.data.dataset=tfds:{name} has {label.num_classes} '
                    f'classes but the preset has {num_classes}; pick a preset '
                    f'(config.model.preset) with {label.num_classes} classes.')
  splits = split_names(spec)
  _check_splits(builder, name, splits)
  sources = builder.as_data_source(
      split=splits, decoders={'image': tfds.decode.SkipDecoding()})
  logging.info('Streaming tfds:%s %s from %s', name,
               {s: len(source) for s, source in zip(splits, sources)},
               builder.data_dir)
  return dict(zip(splits, sources))


def write_prepared(name: str, data_dir: str,
                   splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
  """Writes arrays as a prepared array_record copy of TFDS dataset `name`.

  No TensorFlow needed (Pillow encodes the images in the dataset's format:
  PNG, or JPEG for imagenet2012). For tests, benchmarks and offline
  conversion of arrays one already has. `splits` maps a split name to
  (images, labels [n]): images [n, height, width, channels] uint8, or a list
  of n such [height, width, channels] arrays of different sizes.
  Features other than 'image' and 'label' (e.g. 'id') get placeholder values
  ('<split>_<index>' for text ids). Returns the dataset's directory.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  tfds = _import_tfds()
  reference = tfds.builder(name, data_dir=data_dir)
  features = reference.info.features

  def example(split, index, image, label):
    values = {}
    for key, feature in features.items():
      if key == 'image':
        values[key] = Image.fromarray(image[..., 0] if image.shape[-1] == 1
                                      else image)
      elif key == 'label':
        values[key] = int(label)
      elif isinstance(feature, tfds.features.Text):
        values[key] = f'{split}_{index:05d}'
      else:
        values[key] = 0
    return values

  class _Writer(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = reference.version

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=features,
                                   supervised_keys=('image', 'label'))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {s: self._generate_examples(s) for s in splits}

    def _generate_examples(self, split):
      images, labels = splits[split]
      for i, (image, label) in enumerate(zip(images, labels)):
        yield i, example(split, i, image, label)

  _Writer.name = name
  writer = _Writer(data_dir=data_dir, file_format='array_record')
  writer.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return str(writer.data_dir)
