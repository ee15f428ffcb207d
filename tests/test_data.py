"""Tests of the input side: TFDS and .npz sources, splits, preprocessing."""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking

from helpers import grouped
from nin_jax import config_lib
from nin_jax import datasets
from nin_jax import holdouts
from nin_jax import input_pipeline
from nin_jax import readers
from nin_jax import preprocessing
from nin_jax import sources
from nin_jax import tfds_source
from nin_jax import train

DIGITS = datasets.lookup('sklearn:digits')

DataError = input_pipeline.DataError


def random_split(rng, n, shape):
  return (rng.integers(0, 256, (n, *shape), dtype=np.uint8),
          rng.integers(0, 10, n).astype(np.int32))


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  """A TFDS data_dir with small prepared array_record mnist and svhn_cropped."""
  data_dir = tmp_path_factory.mktemp('tfds')
  rng = np.random.default_rng(0)
  splits = {'mnist': {'train': random_split(rng, 40, (28, 28, 1)),
                      'test': random_split(rng, 12, (28, 28, 1))},
            'svhn_cropped': {'train': random_split(rng, 30, (32, 32, 3)),
                             'test': random_split(rng, 10, (32, 32, 3)),
                             'extra': random_split(rng, 20, (32, 32, 3))}}
  for name, arrays in splits.items():
    tfds_source.write_prepared(name, str(data_dir), arrays)
  return data_dir, splits


def tfds_config(name, data_dir, **fields):
  c = config_lib.default_config()
  c.data.dataset = f'tfds:{name}'
  c.data.data_dir = str(data_dir)
  c.update(grouped(fields))
  return c



# ------------------------------------------------------------------ TFDS --

def test_tfds_arrays_round_trip_in_original_order(tfds_dir, offline):
  data_dir, splits = tfds_dir
  data = tfds_config('svhn_cropped', data_dir, use_extra_split=True).data
  raw = sources.load_raw(data, datasets.lookup(data.dataset))
  expected = splits['svhn_cropped']
  for split in ('train', 'test', 'extra'):
    x, y = getattr(raw, f'x_{split}'), getattr(raw, f'y_{split}')
    np.testing.assert_array_equal(x, expected[split][0])
    np.testing.assert_array_equal(y, expected[split][1])
    assert y.dtype == np.int32
  assert raw.max_value == 255.0


def test_tfds_mnist_keeps_every_example(tfds_dir, offline):
  data_dir, splits = tfds_dir
  raw = sources.load_raw(tfds_config('mnist', data_dir).data,
                         datasets.lookup('tfds:mnist'))
  assert raw.x_train.shape == (40, 28, 28, 1) and raw.x_extra is None
  key = lambda x, y: sorted(zip(y.tolist(), x.reshape(len(y), -1).sum(1)))
  assert key(raw.x_train, raw.y_train) == key(*splits['mnist']['train'])


def test_svhn_trains_on_train_plus_extra(tfds_dir):
  data_dir, _ = tfds_dir
  c = tfds_config('svhn_cropped', data_dir, use_extra_split=True,
                  preset='svhn')
  svhn = datasets.lookup(c.data.dataset)
  dataset = input_pipeline.load_dataset(c.data, svhn, 10)
  assert (len(dataset.train), len(dataset.eval)) == (30 + 20, 10)
  c.data.use_extra_split = False
  assert len(input_pipeline.load_dataset(c.data, svhn, 10).train) == 30


def test_train_and_evaluate_on_mocked_tfds_mnist(tfds_dir, quickstart_config,
                                                 tmp_path, monkeypatch):
  data_dir, _ = tfds_dir
  # tfds 4.9.10's mock assigns __getitems__ on a MagicMock, which does not
  # bind it to the mock (unlike __getitem__): accept calls with or without self.
  monkeypatch.setattr(
      mocking, '_getitems',
      lambda *args, generator, serialized=False: [generator[k]
                                                  for k in args[-1]])
  c = quickstart_config
  c.data.dataset, c.data.data_dir = 'tfds:mnist', str(data_dir)
  c.train.batch_size, c.train.eval_batch_size, c.train.num_train_steps = 16, 32, 3
  c.train.eval_every_steps = c.train.checkpoint_every_steps = 1000
  with tfds.testing.mock_data(num_examples=48,
                              policy=tfds.testing.MockPolicy.USE_FILES,
                              data_dir=str(data_dir)):
    result = train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert result['step'] == 3 and result['examples'] == 48
  assert np.isfinite(result['loss'])


def test_missing_tfds_dataset_fails_fast_and_says_what_to_do(
    tmp_path, offline, monkeypatch):
  """README: nin-jax never downloads, so a dataset that is not prepared fails
  at once, saying how to proceed. What would make it slow is refused and
  recorded: a TFDS download, a network lookup, compiling the model."""
  compiled = []
  monkeypatch.setattr(train, 'create_trainer',
                      lambda *args, **kwargs: compiled.append(args))
  c = tfds_config('cifar10', tmp_path / 'empty_tfds', preset='cifar10')
  with pytest.raises(DataError) as error:
    train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert offline == [] and compiled == []
  message = str(error.value)
  assert '\n' not in message
  assert 'no prepared copy' in message and 'never downloads' in message
  for hint in ('tfds:cifar10', '--config.data.data_dir', 'manual_dir',
               'tfds build cifar10', 'npz:PATH'):
    assert hint in message
  assert not (tmp_path / 'run').exists()


def test_tfrecord_copy_is_refused(tmp_path):
  rng = np.random.default_rng(1)
  path = pathlib.Path(tfds_source.write_prepared(
      'mnist', str(tmp_path), {'train': random_split(rng, 4, (28, 28, 1)),
                               'test': random_split(rng, 2, (28, 28, 1))}))
  info = path / 'dataset_info.json'
  info.write_text(info.read_text().replace('array_record', 'tfrecord'))
  with pytest.raises(DataError, match=r"stored as \['tfrecord'\].*TensorFlow"):
    tfds_source.load_arrays(datasets.lookup('tfds:mnist'), str(tmp_path))


def test_imagenet_in_memory_and_misplaced_extra_are_refused(tmp_path):
  with pytest.raises(DataError, match='imagenet2012 does not fit in host'):
    sources.load_raw(tfds_config('imagenet2012', tmp_path).data,
                     datasets.lookup('tfds:imagenet2012'))
  c = config_lib.default_config()
  c.data.dataset, c.data.use_extra_split = 'sklearn:digits', True
  with pytest.raises(DataError, match='use_extra_split=True'):
    sources.load_raw(c.data, datasets.lookup('sklearn:digits'))


# ----------------------------------------------------- validation splits --

def test_cifar_validation_is_the_last_10000_training_images():
  n = 50_000
  raw = sources.RawData(
      np.arange(n).reshape(n, 1, 1, 1), np.arange(n) % 10,
      np.zeros((5, 1, 1, 1)), np.zeros(5, np.int32), 255.0)
  x_train, y_train, x_val, y_val = holdouts.validation_holdout(
      raw, datasets.lookup('tfds:cifar10'))
  np.testing.assert_array_equal(x_val.ravel(), np.arange(40_000, n))
  np.testing.assert_array_equal(x_train.ravel(), np.arange(40_000))
  np.testing.assert_array_equal(y_val, np.arange(40_000, n) % 10)
  assert len(y_train) == 40_000


def test_svhn_validation_is_400_per_class_of_train_and_200_of_extra():
  rng = np.random.default_rng(0)
  y_train = rng.permutation(np.arange(6000) % 10)
  y_extra = rng.permutation(np.arange(5000) % 10)
  ids = np.arange(11_000).reshape(-1, 1, 1, 1)  # Unique "images".
  raw = sources.RawData(ids[:6000], y_train, ids[:3], y_train[:3], 255.0,
                        ids[6000:], y_extra)
  svhn = datasets.lookup('tfds:svhn_cropped')
  x_train, y_tr, x_val, y_val = holdouts.validation_holdout(raw, svhn)
  val_ids = x_val.ravel()
  from_train, from_extra = val_ids[val_ids < 6000], val_ids[val_ids >= 6000]
  assert np.bincount(y_train[from_train]).tolist() == [400] * 10
  assert np.bincount(y_extra[from_extra - 6000]).tolist() == [200] * 10
  np.testing.assert_array_equal(
      y_val, np.concatenate([y_train, y_extra])[val_ids])
  # Train is everything else of train + extra, nothing lost or repeated.
  assert len(x_train) == 11_000 - 6000
  assert sorted(np.concatenate([x_train.ravel(), val_ids])) == list(
      range(11_000))
  np.testing.assert_array_equal(
      y_tr, np.concatenate([y_train, y_extra])[x_train.ravel()])
  again = holdouts.validation_holdout(raw, svhn)
  np.testing.assert_array_equal(again[2], x_val)  # Fixed, seed-free.


@pytest.mark.parametrize('through', ['csv', 'sklearn'])
def test_digits_are_scikit_learns(monkeypatch, through):
  """The quick start's digits, read from scikit-learn's CSV file or, where
  the file is not found, through scikit-learn's loader: its arrays exactly."""
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  if through == 'sklearn':
    monkeypatch.setattr(readers.importlib.util, 'find_spec', lambda _: None)
  images, labels = readers.digits_arrays()
  digits = sk_datasets.load_digits()
  np.testing.assert_array_equal(images, digits.images)
  np.testing.assert_array_equal(labels, digits.target)
  x_train, y_train, x_test, y_test = readers.load_digits()
  assert (x_train.shape, x_test.shape) == ((1438, 8, 8, 1), (359, 8, 8, 1))
  np.testing.assert_array_equal(np.bincount(y_train) + np.bincount(y_test),
                                np.bincount(digits.target))


def test_validation_split_of_a_small_set_is_its_last_sixth():
  c = config_lib.default_config()
  c.data.dataset, c.data.validation_split, c.model.preset = 'sklearn:digits', True, 'quickstart'
  dataset = input_pipeline.load_dataset(c.data, DIGITS, 10)
  full = readers.load_digits()
  assert dataset.eval_name == 'validation'
  assert len(dataset.eval) == len(full[1]) // 6
  assert len(dataset.train) + len(dataset.eval) == len(full[1])


# --------------------------------------------------------- preprocessing --

def correlated_images(rng, n, shape=(4, 4, 3)):
  """Random float images [n, *shape] with strongly correlated pixels."""
  d = int(np.prod(shape))
  mixing = rng.normal(size=(d, d)) * rng.uniform(0.01, 3.0, size=d)
  return (rng.normal(size=(n, d)) @ mixing + 5.0).reshape(n, *shape)


def test_gcn_matches_numpy():
  rng = np.random.default_rng(0)
  x = correlated_images(rng, 50).astype(np.float32)
  flat = x.reshape(50, -1).astype(np.float64)
  centred = flat - flat.mean(1, keepdims=True)
  expected = 55.0 * centred / np.linalg.norm(centred, axis=1, keepdims=True)
  out = preprocessing.global_contrast_normalize(x)
  np.testing.assert_allclose(out.reshape(50, -1), expected, rtol=1e-5,
                             atol=1e-4)
  constant = np.full((2, 4, 4, 3), 7.0, np.float32)
  assert np.all(preprocessing.global_contrast_normalize(constant) == 0)


def test_zca_whitens_as_an_independent_numpy_computation():
  rng = np.random.default_rng(1)
  x = correlated_images(rng, 4000)
  flat = x.reshape(len(x), -1)
  mean, whiten = preprocessing.fit_zca(x, filter_bias=0.1)
  out = preprocessing.apply_zca(x.astype(np.float32), mean, whiten)
  out = out.reshape(len(x), -1).astype(np.float64)
  # Independently: eigen-decomposition of np.cov via SVD of the centred data.
  centred = flat - flat.mean(0)
  _, s, vt = np.linalg.svd(centred, full_matrices=False)
  eig = s ** 2 / len(x)
  np.testing.assert_allclose(np.cov(centred.T, bias=True),
                             (vt.T * eig) @ vt, atol=1e-6 * eig.max())
  expected_cov = (vt.T * (eig / (eig + 0.1))) @ vt
  cov = np.cov(out.T, bias=True)
  np.testing.assert_allclose(cov, expected_cov, atol=2e-4)
  big = eig > 100 * 0.1
  assert big.sum() > 10
  np.testing.assert_allclose(np.diag(vt[big] @ cov @ vt[big].T), 1.0,
                             atol=0.02)
  np.testing.assert_allclose(out.mean(0), 0.0, atol=1e-3)
  np.testing.assert_allclose(whiten, whiten.T, atol=1e-5)  # ZCA, not PCA.


def test_gcn_zca_uses_training_statistics_only(tmp_path):
  rng = np.random.default_rng(2)
  train_x = rng.integers(0, 256, (600, 4, 4, 3), dtype=np.uint8)
  test_a = rng.integers(0, 256, (50, 4, 4, 3), dtype=np.uint8)
  test_b = np.concatenate([test_a[:10], 255 - test_a[10:]])
  out_train, out_a = preprocessing.preprocess(train_x, test_a, 'gcn_zca',
                                              255.0, str(tmp_path))
  out_train_b, out_b = preprocessing.preprocess(train_x, test_b, 'gcn_zca',
                                                255.0, str(tmp_path))
  np.testing.assert_array_equal(out_train, out_train_b)
  np.testing.assert_array_equal(out_a[:10], out_b[:10])  # Row by row.
  gcn_train = preprocessing.global_contrast_normalize(train_x / 255.0)
  mean, whiten = preprocessing.fit_zca(gcn_train)
  expected = (preprocessing.global_contrast_normalize(test_a / 255.0).reshape(
      50, -1) - mean) @ whiten
  np.testing.assert_allclose(out_a.reshape(50, -1), expected, rtol=1e-4,
                             atol=1e-4)


def test_zca_cache_is_reused_and_keyed_by_the_data(tmp_path, monkeypatch):
  rng = np.random.default_rng(3)
  train_x = rng.integers(0, 256, (300, 4, 4, 3), dtype=np.uint8)
  test_x = train_x[:20]
  first = preprocessing.preprocess(train_x, test_x, 'gcn_zca', 255.0,
                                   str(tmp_path))
  cached = list(tmp_path.glob('zca_*.npz'))
  assert len(cached) == 1
  mtime = os.stat(cached[0]).st_mtime_ns

  def refit(*args, **kwargs):
    raise AssertionError('fit_zca was called although the cache holds it')
  with monkeypatch.context() as patch:
    patch.setattr(preprocessing, 'fit_zca', refit)
    second = preprocessing.preprocess(train_x, test_x, 'gcn_zca', 255.0,
                                      str(tmp_path))
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)
  assert os.stat(cached[0]).st_mtime_ns == mtime
  other = train_x.copy()
  other[0, 0, 0, 0] ^= 1
  preprocessing.preprocess(other, test_x, 'gcn_zca', 255.0, str(tmp_path))
  assert len(list(tmp_path.glob('zca_*.npz'))) == 2


def test_standardize_uses_training_mean_and_std():
  rng = np.random.default_rng(4)
  train_x = rng.integers(0, 200, (500, 5, 5, 3), dtype=np.uint8)
  test_x = rng.integers(50, 256, (40, 5, 5, 3), dtype=np.uint8)
  out_train, out_test = preprocessing.preprocess(train_x, test_x,
                                                 'standardize', 255.0)
  np.testing.assert_allclose(out_train.mean((0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(out_train.std((0, 1, 2)), 1.0, atol=1e-5)
  scaled = train_x / 255.0
  expected = (test_x / 255.0 - scaled.mean((0, 1, 2))) / scaled.std((0, 1, 2))
  np.testing.assert_allclose(out_test, expected, rtol=1e-5, atol=1e-5)


def test_lcn_normalizes_locally_and_ignores_brightness_and_contrast():
  rng = np.random.default_rng(5)
  x = rng.uniform(size=(9, 16, 16, 3)).astype(np.float32)
  out = preprocessing.local_contrast_normalize(x)
  assert out.shape == x.shape and out.dtype == np.float32
  assert np.abs(out.mean()) < 0.05 and 0.5 < out.std() < 2.0
  np.testing.assert_allclose(
      preprocessing.local_contrast_normalize(3.0 * x + 10.0), out, atol=1e-3)
  np.testing.assert_allclose(
      preprocessing.local_contrast_normalize(x, chunk=4), out, atol=1e-6)
  flat = preprocessing.local_contrast_normalize(np.full((2, 8, 8, 1), 0.5))
  assert np.all(np.isfinite(flat)) and np.abs(flat).max() < 1e-3


def test_scale_maps_pixels_to_unit_interval():
  x = np.array([0, 51, 255], np.uint8).reshape(3, 1, 1, 1)
  out, _ = preprocessing.preprocess(x, x, 'scale', 255.0)
  np.testing.assert_allclose(out.ravel(), [0.0, 0.2, 1.0], atol=1e-7)


# ------------------------------------------------------------------- npz --

def write_npz(path, **overrides):
  arrays = dict(
      x_train=np.zeros((20, 8, 8), np.uint8), y_train=np.arange(20) % 10,
      x_test=np.zeros((10, 8, 8), np.uint8), y_test=np.arange(10) % 10)
  arrays.update(overrides)
  np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
  return str(path)


@pytest.mark.parametrize('overrides,message', [
    ({'x_train': np.zeros((0, 8, 8), np.uint8), 'y_train': np.zeros(0, int)},
     'x_train holds 0 images'),
    ({'x_test': np.zeros((0, 8, 8), np.uint8), 'y_test': np.zeros(0, int)},
     'x_test holds 0 images'),
    ({'x_train': np.zeros((20, 8, 8, 4), np.uint8)},
     r'x_train has shape \(20, 8, 8, 4\); expected .*1 or 3'),
    ({'x_train': np.zeros((20, 3, 8, 8), np.uint8)}, 'channels first'),
    ({'x_train': np.zeros((20, 8, 6), np.uint8)}, 'x_train .* 8x6.*square'),
    ({'x_train': np.zeros((20, 8, 8, 3), np.uint8)},
     r'x_train images are \(8, 8, 3\) but x_test images are \(8, 8, 1\)'),
    ({'y_train': np.zeros(20, bool)}, 'y_train has dtype bool'),
    ({'y_test': np.zeros(10, np.float32)}, 'y_test has dtype float32'),
    ({'y_test': np.zeros((10, 2), int)}, r'y_test has shape \(10, 2\)'),
    ({'x_test': np.zeros((10, 8, 8), np.int16)}, 'x_test has dtype int16'),
    ({'y_train': np.full(20, 2**32 + 3)},
     r'y_train labels span \[4294967299'),
])
def test_bad_npz_is_one_line_naming_file_and_key(tmp_path, overrides,
                                                 message):
  path = write_npz(tmp_path / 'bad.npz', **overrides)
  with pytest.raises(DataError, match=message) as error:
    readers.load_npz(path)
  assert '\n' not in str(error.value) and path in str(error.value)


def test_npz_that_is_not_an_archive(tmp_path):
  np.save(tmp_path / 'one.npy', np.zeros(3))
  with pytest.raises(DataError, match=r'single \.npy array.*np\.savez'):
    readers.load_npz(str(tmp_path / 'one.npy'))
  (tmp_path / 'text.npz').write_text('x_train,y_train\n1,2\n')
  with pytest.raises(DataError, match=r'not a \.npz \(zip\) archive'):
    readers.load_npz(str(tmp_path / 'text.npz'))
  with pytest.raises(DataError, match='no such file'):
    readers.load_npz(str(tmp_path))


def test_npz_accepts_column_labels_and_mixed_channel_axis(tmp_path):
  path = write_npz(tmp_path / 'ok.npz',
                   x_test=np.zeros((10, 8, 8, 1), np.uint8),
                   y_train=(np.arange(20) % 10).reshape(20, 1).astype(np.uint8))
  x_train, y_train, x_test, y_test = readers.load_npz(path)
  assert x_train.shape == (20, 8, 8, 1) and x_test.shape == (10, 8, 8, 1)
  assert y_train.shape == (20,) and y_train.dtype == y_test.dtype == np.int32


@pytest.mark.parametrize('method', ['scale', 'none', 'standardize', 'gcn_zca',
                                    'lcn'])
def test_device_normalizer_computes_what_the_host_does(method, tmp_path):
  """Exported models and streamed batches normalize on device what
  in-memory splits normalize on the host, from the same fitted statistics."""
  rng = np.random.default_rng(6)
  train_x = rng.integers(0, 256, (300, 8, 8, 3), dtype=np.uint8)
  test_x = rng.integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
  fitted = preprocessing.fit(train_x, method, 255.0, str(tmp_path))
  host = preprocessing.apply(fitted, test_x)
  device = jax.jit(preprocessing.normalizer(fitted))(test_x)
  assert device.dtype == jnp.float32 and host.dtype == np.float32
  np.testing.assert_allclose(np.asarray(device), host, rtol=2e-4, atol=2e-4)


def test_caffe_normalization_is_bgr_minus_the_mean():
  rng = np.random.default_rng(7)
  images = rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
  mean = np.float32([104.0, 117.0, 123.0])
  fitted = preprocessing.Fitted('caffe', 255.0, {'mean': mean})
  expected = images[..., ::-1].astype(np.float32) - mean
  np.testing.assert_array_equal(preprocessing.apply(fitted, images), expected)
  np.testing.assert_array_equal(
      np.asarray(preprocessing.normalizer(fitted)(images)), expected)
  with pytest.raises(ValueError, match="needs statistics \\['mean'\\]"):
    preprocessing.Fitted('caffe', 255.0)


def test_load_split_gives_the_runs_splits_with_saved_statistics():
  c = config_lib.default_config()
  c.data.update(dataset='sklearn:digits', preprocessing='standardize',
                validation_split=True, max_train_examples=1000)
  c.model.preset = 'quickstart'
  dataset = input_pipeline.load_dataset(c.data, DIGITS, 10)
  assert dataset.fitted.method == 'standardize'
  for split, expected in (('train', dataset.train),
                          ('validation', dataset.eval)):
    loaded = input_pipeline.load_split(c.data, DIGITS, split, dataset.fitted,
                                       10)
    np.testing.assert_array_equal(loaded.images, expected.images)
    np.testing.assert_array_equal(loaded.labels, expected.labels)
  test = input_pipeline.load_split(c.data, DIGITS, 'test', dataset.fitted, 10)
  assert len(test) == 359 and test.images.dtype == np.float32
  c.data.validation_split = False
  with pytest.raises(DataError, match="held out no 'validation' split"):
    input_pipeline.load_split(c.data, DIGITS, 'validation', dataset.fitted,
                              10)


def test_tfds_test_split_read_alone_and_class_names(tfds_dir):
  data_dir, splits = tfds_dir
  c = tfds_config('mnist', data_dir)
  mnist = datasets.lookup('tfds:mnist')
  x, y, max_value = sources.load_raw_test(c.data, mnist)
  assert x.shape[1:] == (28, 28, 1) and max_value == 255.0
  assert sorted(y.tolist()) == sorted(splits['mnist']['test'][1].tolist())
  assert sources.class_names(c.data, mnist, 10) == tuple('0123456789')
  npz = config_lib.default_config().data
  cifar_npz = datasets.lookup('npz:/data/cifar10.npz')
  assert sources.class_names(npz, cifar_npz, 10)[:2] == ('airplane',
                                                        'automobile')
  digits_npz = datasets.lookup('npz:/data/digits.npz')
  assert sources.class_names(npz, digits_npz, 3) == ('0', '1', '2')
