"""Tests of the streamed ImageNet input: crops, decoding, order, processes."""

import io
import math
import threading

import jax
import numpy as np
import pytest
from PIL import Image

from helpers import grouped, write_tiny_imagenet
from nin_jax import augmentation
from nin_jax import batching
from nin_jax import config_lib
from nin_jax import datasets
from nin_jax import inference
from nin_jax import input_pipeline
from nin_jax import input_spec
from nin_jax import models
from nin_jax import preprocessing
from nin_jax import streaming
from nin_jax import train
from nin_jax import validation

DataError = input_pipeline.DataError
SIZE = 32
IMAGENET = datasets.lookup('tfds:imagenet2012')
# A 1000-class NiN small enough to train a few steps in a second or two.
TINY_PRESET = models.Preset((
    models.BlockSpec((16,), kernel_size=3, stride=2, pool='max'),
    models.BlockSpec((16,), kernel_size=3, padding=1),
), 1000, SIZE, 3)


@pytest.fixture(scope='module')
def imagenet_dir(tmp_path_factory):
  """A TFDS data_dir holding a tiny prepared imagenet2012: 40 train and 12
  validation JPEGs of varied sizes; returns (data_dir, labels by split)."""
  data_dir = tmp_path_factory.mktemp('imagenet')
  write_tiny_imagenet(data_dir)
  return data_dir


def imagenet_config(data_dir, **fields):
  c = config_lib.default_config()
  c.model.preset = 'imagenet'
  c.data.update(dataset='tfds:imagenet2012', data_dir=str(data_dir),
                preprocessing='standardize', augment=True, image_size=SIZE,
                data_workers=2)
  c.update(grouped(fields))
  return c


@pytest.fixture(scope='module')
def dataset(imagenet_dir):
  return input_pipeline.load_dataset(imagenet_config(imagenet_dir).data,
                                     IMAGENET, 1000)


@pytest.fixture
def sharding():
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def host_batches(iterator, n):
  """The first n batches of `iterator` as (images, labels) numpy arrays;
  closes it."""
  batches = [tuple(np.asarray(b[k]) for k in ('image', 'label'))
             for b in (next(iterator) for _ in range(n))]
  iterator.close()
  return batches


def source_labels(split):
  return np.asarray([r['label'] for r in split.source.__getitems__(
      list(range(len(split))))])


def live_input_threads():
  return [t.name for t in threading.enumerate()
          if t.name.startswith(('nin_jax_prefetch', 'nin_jax_decode'))]


# ----------------------------------------------------------------- crops --

def test_random_crops_stay_in_the_image_and_in_the_bounds():
  rng = np.random.default_rng(0)
  areas, aspects = [], []
  for _ in range(2000):
    height, width = (int(v) for v in rng.integers(16, 600, 2))
    top, left, h, w = streaming.sample_crop(height, width, rng)
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    assert h > 0 and w > 0
    if (top, left, h, w) == streaming.fallback_crop(height, width):
      continue
    # Rounding to whole pixels moves each side by at most half a pixel.
    low = (w - 0.5) * (h - 0.5) / (height * width)
    high = (w + 0.5) * (h + 0.5) / (height * width)
    assert low <= 1.0 and high >= 0.08
    assert (w - 0.5) / (h + 0.5) <= 4 / 3 and (w + 0.5) / (h - 0.5) >= 3 / 4
    areas.append(w * h / (height * width))
    aspects.append(w / h)
  assert len(areas) > 1500  # The rest: strips of extreme aspect ratio.
  assert min(areas) < 0.1 and max(areas) > 0.95
  assert min(aspects) < 0.8 and max(aspects) > 1.25


def test_fallback_and_central_crops():
  # A 10x400 strip fits no crop of area >= 8% and aspect <= 4/3.
  rng = np.random.default_rng(1)
  assert streaming.sample_crop(10, 400, rng) == (0, 193, 10, 13)
  assert streaming.fallback_crop(400, 10) == (193, 0, 13, 10)
  assert streaming.fallback_crop(30, 35) == (0, 0, 30, 35)
  top, left, h, w = streaming.central_crop(256, 320)
  assert (h, w) == (224, 224) and (top, left) == (16, 48)


def encode(pixels, fmt='jpeg'):
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format=fmt, quality=95)
  return buffer.getvalue()


def test_draft_decoding_matches_a_full_decode():
  yy, xx = np.mgrid[0:300, 0:400]
  pixels = np.stack([xx * 255 // 400, yy * 255 // 300, 128 + 0 * xx],
                    -1).astype(np.uint8)
  encoded = encode(pixels)
  out = streaming.decode_crop(encoded, SIZE, None, False)
  top, left, h, w = streaming.central_crop(300, 400)
  full = Image.open(io.BytesIO(encoded)).convert('RGB').resize(
      (SIZE, SIZE), Image.Resampling.BILINEAR, box=(left, top, left + w,
                                                    top + h))
  assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
  assert np.abs(out.astype(int) - np.asarray(full)).mean() < 2.0
  gray = streaming.decode_crop(encode(pixels[..., 0]), SIZE, None, False)
  assert gray.shape == (SIZE, SIZE, 3)
  png = streaming.decode_crop(encode(pixels, 'png'), SIZE, None, False)
  assert np.abs(png.astype(int) - np.asarray(full)).mean() < 2.0


def test_flip_mirrors_the_same_crop():
  rng = np.random.default_rng(2)
  encoded = encode(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
  flipped = 0
  for row in range(12):
    plain = streaming.decode_crop(encoded, 16,
                                  streaming.example_rng(0, 0, row), False)
    maybe = streaming.decode_crop(encoded, 16,
                                  streaming.example_rng(0, 0, row), True)
    if not np.array_equal(plain, maybe):
      np.testing.assert_array_equal(maybe, plain[:, ::-1])
      flipped += 1
  assert 0 < flipped < 12


# ---------------------------------------------------------------- splits --

def test_streamed_dataset_shapes_and_labels(dataset, sharding):
  assert isinstance(dataset.train, streaming.StreamSplit)
  assert (len(dataset.train), len(dataset.eval)) == (40, 12)
  assert dataset.eval_name == 'validation'
  assert dataset.image_shape == (SIZE, SIZE, 3)
  [(images, labels)] = host_batches(
      batching.train_batches(dataset.train, 0, 8, 0, sharding), 1)
  assert images.shape == (8, SIZE, SIZE, 3) and images.dtype == np.uint8
  assert labels.dtype == np.int32
  idx = batching.train_batch_indices(0, 0, 8, 40)
  np.testing.assert_array_equal(labels, source_labels(dataset.train)[idx])


def test_batches_are_a_function_of_seed_and_step_and_resume_exactly(
    dataset, sharding):
  first = host_batches(
      batching.train_batches(dataset.train, 0, 8, 0, sharding), 7)
  again = host_batches(
      batching.train_batches(dataset.train, 0, 8, 0, sharding), 7)
  resumed = host_batches(
      batching.train_batches(dataset.train, 0, 8, 4, sharding), 3)
  # Steps 0-4 are epoch 0 (40 examples, batch 8), 5-6 epoch 1.
  for a, b in zip(first + first[4:], again + resumed):
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(first[0][0], first[1][0])
  other_seed = host_batches(
      batching.train_batches(dataset.train, 1, 8, 0, sharding), 1)
  assert not np.array_equal(first[0][0], other_seed[0][0])


def test_each_process_decodes_its_rows_of_the_same_global_batch(
    dataset, sharding, monkeypatch):
  whole = host_batches(
      batching.train_batches(dataset.train, 3, 8, 2, sharding), 2)
  parts = []
  for process in range(2):
    monkeypatch.setattr(batching, 'process_rows',
                        lambda n, p=process: slice(p * n // 2,
                                                   (p + 1) * n // 2))
    parts.append(host_batches(
        batching.train_batches(dataset.train, 3, 8, 2, sharding), 2))
  for step in range(2):
    for i in range(2):  # images, labels
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][i], parts[1][step][i]]),
          whole[step][i])


def test_eval_covers_every_example_once_with_central_crops(dataset,
                                                           sharding):
  batches = list(batching.eval_batches(dataset.eval, 5, sharding))
  images, labels, mask = (np.concatenate([np.asarray(b[k]) for b in batches])
                          for k in ('image', 'label', 'mask'))
  assert len(batches) == 3 and mask.tolist() == [True] * 12 + [False] * 3
  np.testing.assert_array_equal(labels[:12], source_labels(dataset.eval))
  records = dataset.eval.source.__getitems__([0, 11])
  for image, record in zip(images[[0, 11]], records):
    np.testing.assert_array_equal(
        image, streaming.decode_crop(record['image'], SIZE, None, False))
  assert live_input_threads() == []


def test_without_augment_training_uses_central_crops(imagenet_dir, sharding):
  plain = input_pipeline.load_dataset(
      imagenet_config(imagenet_dir, augment=False).data, IMAGENET, 1000)
  [(images, _)] = host_batches(
      batching.train_batches(plain.train, 0, 4, 0, sharding), 1)
  idx = batching.train_batch_indices(0, 0, 4, 40)
  record = plain.train.source.__getitems__([int(idx[0])])[0]
  np.testing.assert_array_equal(
      images[0], streaming.decode_crop(record['image'], SIZE, None, False))


class BrokenSource:
  """Three examples; example 1's image is not an image."""

  def __len__(self):
    return 3

  def __getitems__(self, keys):
    good = encode(np.zeros((20, 20, 3), np.uint8))
    return [{'image': b'not a jpeg' if k == 1 else good, 'label': 0}
            for k in keys]


def test_decode_errors_reach_the_caller_naming_the_example(sharding):
  split = streaming.StreamSplit(BrokenSource(), 'tfds:imagenet2012 train',
                                SIZE, True, True, 2, 3)
  batches = batching.eval_batches(split, 2, sharding)
  with pytest.raises(DataError, match=r'imagenet2012 train example 1: '
                     r'cannot decode its image \(UnidentifiedImageError'):
    list(batches)
  assert live_input_threads() == []


@pytest.mark.parametrize('taken', [0, 1])
def test_closing_the_iterator_stops_its_threads(dataset, sharding, taken):
  batches = batching.train_batches(dataset.train, 0, 8, 0, sharding)
  for _ in range(taken):
    next(batches)
  assert live_input_threads()
  batches.close()
  assert live_input_threads() == []


# ----------------------------------------------------------- config, e2e --

def test_streamed_config_errors_name_the_field(imagenet_dir):
  c = imagenet_config(imagenet_dir, preprocessing='gcn_zca')
  with pytest.raises(config_lib.ConfigError,
                     match=r"config\.data\.preprocessing='gcn_zca'.*streamed"):
    validation.validate_config(c)
  with pytest.raises(config_lib.ConfigError, match=r'config\.data\.validation_split'):
    validation.validate_config(imagenet_config(imagenet_dir,
                                               validation_split=True))
  cifar = config_lib.default_config()
  cifar.data.image_size = 64
  with pytest.raises(config_lib.ConfigError,
                     match=r'config\.data\.image_size=64.*set it to 0'):
    validation.validate_config(cifar)
  c = imagenet_config(imagenet_dir, image_size=8)
  with pytest.raises(config_lib.ConfigError, match='raise config.data.image_size'):
    config_lib.check_image_size(c, IMAGENET, 8, 8, 3)
  assert config_lib.streamed_image_size(imagenet_config(
      imagenet_dir, image_size=0)) == 224
  with pytest.raises(DataError, match='1000 classes but the preset has 10'):
    input_pipeline.load_dataset(imagenet_config(imagenet_dir).data, IMAGENET,
                                10)


def test_missing_imagenet_fails_fast(tmp_path, offline):
  """README: nin-jax never downloads, so a dataset that is not prepared fails
  at once. What would make it slow is refused and recorded: a TFDS download
  or a network lookup; and no decoding thread is started."""
  with pytest.raises(DataError, match='no prepared copy.*never downloads.*'
                     'tfds build imagenet2012'):
    input_pipeline.load_dataset(imagenet_config(tmp_path / 'none').data,
                                IMAGENET, 1000)
  assert offline == []
  assert live_input_threads() == []


def test_device_normalization_and_no_device_augment(imagenet_dir, dataset):
  """A streamed dataset carries the fixed normalization its batches get on
  device; it is augmented on the host, never in the train step."""
  c = imagenet_config(imagenet_dir)
  assert augmentation.device_augment_fn(c.data, IMAGENET) is None
  fixed = input_pipeline.streamed_fitted(c.data, IMAGENET)
  assert (dataset.fitted.method, dataset.fitted.max_value) == (
      fixed.method, fixed.max_value) == ('standardize', 255)
  for name in ('mean', 'std'):
    np.testing.assert_array_equal(dataset.fitted.arrays[name],
                                  fixed.arrays[name])
  pixels = np.arange(24, dtype=np.uint8).reshape(1, 2, 4, 3) * 10
  normalize = lambda data: np.asarray(preprocessing.normalizer(
      input_pipeline.streamed_fitted(data, IMAGENET))(pixels))
  mean = np.array([0.485, 0.456, 0.406]) * 255
  std = np.array([0.229, 0.224, 0.225]) * 255
  np.testing.assert_allclose(normalize(c.data), (pixels - mean) / std,
                             rtol=1e-5)
  c.data.preprocessing = 'scale'
  np.testing.assert_allclose(normalize(c.data), pixels / 255.0, rtol=1e-6)


def test_train_and_evaluate_streams_imagenet(imagenet_dir, tmp_path,
                                             monkeypatch):
  monkeypatch.setitem(models.PRESETS, 'tiny_imagenet', TINY_PRESET)
  c = imagenet_config(imagenet_dir, preset='tiny_imagenet', image_size=0,
                      batch_size=8, eval_batch_size=8, num_train_steps=3,
                      log_every_steps=1, eval_every_steps=1000,
                      checkpoint_every_steps=1000)
  c.model.weight_init, c.model.batch_norm = 'modern', True
  result = train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert result['step'] == 3 and result['examples'] == 12
  assert math.isfinite(result['loss'])
  assert live_input_threads() == []
  # The saved spec: the central 87.5% square, the ImageNet mean and std.
  spec = input_spec.load(str(tmp_path / 'run'))
  assert (spec.crop_fraction, spec.square_crop) == (0.875, True)
  assert spec.fitted.method == 'standardize' and spec.image_shape == (
      SIZE, SIZE, 3)
  again = inference.evaluate(str(tmp_path / 'run'))
  assert live_input_threads() == []
  for key in ('loss', 'accuracy', 'top5_accuracy', 'examples', 'step'):
    assert again[key] == result[key], key
