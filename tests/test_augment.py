"""The training augmentation: random translation within `translate_pixels`,
horizontal flips with probability 1/2, and never a flip for digits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nin_jax import augmentation
from nin_jax import config_lib
from nin_jax import datasets

CIFAR10 = datasets.lookup('tfds:cifar10')

HEIGHT, WIDTH = 6, 7


def position_images(n: int, channels: int = 1) -> np.ndarray:
  """[n, H, W, channels] images whose pixel (y, x) holds 1 + y * W + x."""
  image = 1.0 + np.arange(HEIGHT * WIDTH, dtype=np.float32).reshape(
      HEIGHT, WIDTH)
  return np.broadcast_to(image[None, :, :, None],
                         (n, HEIGHT, WIDTH, channels)).copy()


def decode(out: np.ndarray) -> tuple[int, int, bool]:
  """(dy, dx, flipped) of one augmented position image [H, W]: output pixel
  (y, x) shows source pixel (y + dy, x + dx), mirrored when flipped.

  Asserts that the image is exactly such a shift, zero-filled outside."""
  ys, xs = np.nonzero(out)
  assert len(ys) > 0, 'the whole image was shifted out'
  src_y, src_x = np.divmod(out[ys, xs].astype(int) - 1, WIDTH)
  dy = set((src_y - ys).tolist())
  assert len(dy) == 1, out
  same_row = xs[ys == ys[0]]
  flipped = len(same_row) > 1 and out[ys[0], same_row[1]] < out[
      ys[0], same_row[0]]
  cols = (WIDTH - 1 - xs) if flipped else xs
  dx = set((src_x - cols).tolist())
  assert len(dx) == 1, out
  dy, dx = dy.pop(), dx.pop()
  expected = np.zeros_like(out)
  for y in range(HEIGHT):
    for x in range(WIDTH):
      sy, sx = y + dy, (WIDTH - 1 - x if flipped else x) + dx
      if 0 <= sy < HEIGHT and 0 <= sx < WIDTH:
        expected[y, x] = 1 + sy * WIDTH + sx
  np.testing.assert_array_equal(out, expected)
  return dy, dx, flipped


def run_augment(n, translate, flip, seed=0, channels=1):
  out = augmentation.augment(jnp.asarray(position_images(n, channels)),
                               jax.random.key(seed), translate, flip)
  return np.asarray(out)


def test_translation_stays_within_translate_pixels_and_covers_it():
  translate = 2
  out = run_augment(1000, translate, flip=False)
  shifts = [decode(o[..., 0]) for o in out]
  assert not any(flipped for _, _, flipped in shifts)
  seen = {(dy, dx) for dy, dx, _ in shifts}
  assert all(abs(dy) <= translate and abs(dx) <= translate
             for dy, dx in seen), seen
  # 1,000 draws from 25 equally likely shifts: each appears.
  assert len(seen) == (2 * translate + 1) ** 2


def test_flips_with_probability_one_half():
  n = 4000
  out = run_augment(n, 0, flip=True, seed=3)
  flips = sum(decode(o[..., 0])[2] for o in out)
  # Binomial(4000, 1/2): standard deviation 31.6; 5 of them is a bound no
  # fair coin misses, while p = 0.45 or 0.55 (or always/never) fails it.
  assert abs(flips - n / 2) < 5 * np.sqrt(n / 4), flips
  assert all(decode(o[..., 0])[:2] == (0, 0) for o in out)


def test_every_channel_moves_together():
  out = run_augment(200, 1, flip=True, seed=5, channels=3)
  np.testing.assert_array_equal(out[..., 0], out[..., 1])
  np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_no_translation_no_flip_is_the_identity():
  images = position_images(8)
  np.testing.assert_array_equal(run_augment(8, 0, flip=False), images)


def test_augmentation_is_a_function_of_the_key():
  np.testing.assert_array_equal(run_augment(64, 2, True, seed=7),
                                run_augment(64, 2, True, seed=7))
  assert not np.array_equal(run_augment(64, 2, True, seed=7),
                            run_augment(64, 2, True, seed=8))


def config_for(dataset, flip=True):
  c = config_lib.default_config()
  c.data.update(dataset=dataset, augment=True, flip=flip, translate_pixels=1)
  return c


@pytest.mark.parametrize('dataset', [
    'sklearn:digits', 'tfds:mnist', 'tfds:svhn_cropped',
    'npz:/data/mnist/mnist.npz', 'npz:/data/MNIST.npz'])
def test_digits_are_never_flipped(dataset):
  fn = augmentation.device_augment_fn(config_for(dataset).data,
                                      datasets.lookup(dataset))
  out = np.asarray(fn(jnp.asarray(position_images(500)), jax.random.key(1)))
  results = [decode(o[..., 0]) for o in out]
  assert not any(flipped for _, _, flipped in results)
  assert {(dy, dx) for dy, dx, _ in results} != {(0, 0)}  # Still translated.


def test_natural_images_are_flipped_unless_switched_off():
  images = jnp.asarray(position_images(500))
  fn = augmentation.device_augment_fn(config_for('tfds:cifar10').data, CIFAR10)
  flips = [decode(o[..., 0])[2] for o in np.asarray(fn(images,
                                                        jax.random.key(1)))]
  assert 150 < sum(flips) < 350
  fn = augmentation.device_augment_fn(
      config_for('tfds:cifar10', flip=False).data, CIFAR10)
  assert not any(decode(o[..., 0])[2] for o in np.asarray(
      fn(images, jax.random.key(1))))


def test_no_augment_fn_when_augment_is_off():
  c = config_for('tfds:cifar10')
  c.data.augment = False
  assert augmentation.device_augment_fn(c.data, CIFAR10) is None


def test_translation_larger_than_the_image_is_refused():
  c = config_for('tfds:cifar10')
  c.data.translate_pixels = 32
  with pytest.raises(config_lib.ConfigError, match='translate_pixels'):
    config_lib.check_image_size(c, CIFAR10, 32, 32, 3)
  c.data.translate_pixels = 31
  config_lib.check_image_size(c, CIFAR10, 32, 32, 3)
