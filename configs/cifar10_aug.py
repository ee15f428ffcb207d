# pylint: disable=line-too-long
r"""NiN on CIFAR-10 with translation and flip augmentation (Table 1: 8.81%).

  python -m nin_jax.main --config=configs/cifar10_aug.py --workdir=runs/cifar10_aug
  python -m nin_jax.main --config=configs/cifar10_aug.py --workdir=runs/cifar10_aug \
      --config.data.dataset=npz:../shared/data/cifar10/cifar10.npz

Variants (`--config=configs/cifar10_aug.py:VARIANT`) are configs/cifar10.py's:
`gap` (default), `fc`, `fc_dropout`, `caffe`, and `faithful` (the author's
N(0, 0.05) init without BatchNorm).
"""

import ml_collections

from nin_jax import config_lib


def get_config(variant: str = 'gap') -> ml_collections.ConfigDict:
  c = config_lib.sibling_config(__file__, 'cifar10.py', variant)
  c.data.augment = True
  c.data.translate_pixels = 4           # Pad 4 and crop back to 32x32.
  c.data.flip = True
  c.train.num_epochs = 200.0
  return c
