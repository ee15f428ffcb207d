"""Readers of in-memory datasets: scikit-learn's digits and Keras-layout .npz.

Each returns unprocessed uint8 (or 0..16 digits) arrays and checks what it
reads, naming the file, the key and the fix in a DataError. They depend on
nothing above them in nin_jax.
"""

from __future__ import annotations

import importlib.util
import os
import zipfile

import numpy as np

from nin_jax.errors import DataError


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 1,797 digits: (images [1797, 8, 8] float64 0..16, labels).

  Read from the CSV file scikit-learn ships, found without importing
  scikit-learn (its import takes longer than the quick start's data); where
  an installation lays its files out otherwise, through its own loader.
  """
  spec = importlib.util.find_spec('sklearn')
  for root in (spec.submodule_search_locations or []) if spec else []:
    path = os.path.join(root, 'datasets', 'data', 'digits.csv.gz')
    if os.path.exists(path):
      data = np.loadtxt(path, delimiter=',')
      return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  digits = sk_datasets.load_digits()
  return digits.images, digits.target


def load_digits(seed: int = 0, test_fraction: float = 0.2
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """scikit-learn's 8x8 digits: (x_train, y_train, x_test, y_test), pixels 0..16."""
  images, labels = digits_arrays()
  images = images.astype(np.float32)[..., None]
  labels = labels.astype(np.int32)
  rng = np.random.default_rng(seed)
  train_idx, test_idx = [], []
  for cls in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == cls))
    n_test = int(round(len(idx) * test_fraction))
    test_idx.append(idx[:n_test])
    train_idx.append(idx[n_test:])
  train_idx = np.sort(np.concatenate(train_idx))
  test_idx = np.sort(np.concatenate(test_idx))
  return (images[train_idx], labels[train_idx], images[test_idx],
          labels[test_idx])


NPZ_KEYS = ('x_train', 'y_train', 'x_test', 'y_test')


def _read_npz(path: str, keys: tuple[str, ...] = NPZ_KEYS
              ) -> list[np.ndarray]:
  """The arrays `keys` of `path`, read without pickle, or DataError."""
  if not os.path.isfile(path):
    raise DataError(f'config.data.dataset=npz:{path}: no such file; point it at a '
                    f'.npz with keys {NPZ_KEYS}.')
  with open(path, 'rb') as f:
    magic = f.read(6)
  if magic.startswith(b'\x93NUMPY'):
    raise DataError(f'{path}: is a single .npy array, not a .npz archive; '
                    f'save one with np.savez(path, x_train=..., y_train=..., '
                    f'x_test=..., y_test=...).')
  if not magic.startswith(b'PK'):
    raise DataError(f'{path}: not a .npz (zip) archive; save one with '
                    f'np.savez(path, x_train=..., y_train=..., x_test=..., '
                    f'y_test=...).')
  try:
    with np.load(path, allow_pickle=False) as f:
      missing = [k for k in keys if k not in f.files]
      if missing:
        raise DataError(f'{path}: missing keys {missing}; found {f.files}, '
                        f'need {keys}.')
      return [f[k] for k in keys]
  except ValueError as e:
    if isinstance(e, DataError):
      raise
    raise DataError(f'{path}: cannot be read without pickle ({e}); save the '
                    f'arrays as plain numeric arrays.') from e
  except (OSError, EOFError, zipfile.BadZipFile) as e:
    raise DataError(f'{path}: not a readable .npz file ({e}).') from e


def _check_images(path: str, key: str, x: np.ndarray) -> np.ndarray:
  """`x` as [n, height, width, channels] uint8, or a DataError naming `key`."""
  if x.dtype != np.uint8:
    raise DataError(f'{path}: {key} has dtype {x.dtype}; expected uint8 '
                    f'pixels 0..255.')
  if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
    hint = (' (channels first? transpose to [n, height, width, channels])'
            if x.ndim == 4 and x.shape[1] in (1, 3) else '')
    raise DataError(f'{path}: {key} has shape {x.shape}; expected '
                    f'[n, height, width] or [n, height, width, 1 or 3]{hint}.')
  if x.shape[0] == 0:
    raise DataError(f'{path}: {key} holds 0 images; it needs at least one.')
  if x.shape[1] != x.shape[2]:
    raise DataError(f'{path}: {key} has shape {x.shape}: images are '
                    f'{x.shape[1]}x{x.shape[2]}, but NiN expects square '
                    f'[n, size, size(, channels)] images.')
  return x if x.ndim == 4 else x[..., None]


def _check_labels_shape(path: str, key: str, y: np.ndarray,
                        num_images: int) -> np.ndarray:
  """`y` as [n] int32, or a DataError naming `key`."""
  if not np.issubdtype(y.dtype, np.integer):
    raise DataError(f'{path}: {key} has dtype {y.dtype}; expected integer '
                    f'class labels.')
  flat = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
  if flat.ndim != 1 or flat.shape[0] != num_images:
    raise DataError(f'{path}: {key} has shape {y.shape}; expected '
                    f'[{num_images}] labels, one per image.')
  if flat.size and (flat.min() < 0 or flat.max() > np.iinfo(np.int32).max):
    raise DataError(f'{path}: {key} labels span [{flat.min()}, {flat.max()}]; '
                    f'expected class indices 0..num_classes-1.')
  return flat.astype(np.int32)


def _check_split(path: str, split: str, x: np.ndarray, y: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
  x = _check_images(path, f'x_{split}', x)
  return x, _check_labels_shape(path, f'y_{split}', y, x.shape[0])


def load_npz_split(path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads and checks one split ('train' or 'test') of a Keras-layout .npz,
  and only its arrays: images [n, h, w, c] uint8 (3-D images gain a channel
  axis), labels [n] int32."""
  return _check_split(path, split,
                      *_read_npz(path, (f'x_{split}', f'y_{split}')))


def load_npz(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                 np.ndarray]:
  """Reads and checks a Keras-layout .npz: (x_train, y_train, x_test, y_test)
  as `load_npz_split` reads them, images of the same shape."""
  x_train, y_train, x_test, y_test = _read_npz(path)
  x_train, y_train = _check_split(path, 'train', x_train, y_train)
  x_test, y_test = _check_split(path, 'test', x_test, y_test)
  if x_train.shape[1:] != x_test.shape[1:]:
    raise DataError(f'{path}: x_train images are {x_train.shape[1:]} but '
                    f'x_test images are {x_test.shape[1:]}; both must have '
                    f'the same [height, width, channels].')
  return x_train, y_train, x_test, y_test
