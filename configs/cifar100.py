# pylint: disable=line-too-long
r"""NiN on CIFAR-100 without augmentation (Table 3: 35.68% test error).

  python -m nin_jax.main --config=configs/cifar100.py --workdir=runs/cifar100
"""

import ml_collections

from nin_jax import config_lib


def get_config() -> ml_collections.ConfigDict:
  c = config_lib.sibling_config(__file__, 'cifar10.py')
  c.model.preset = 'cifar100'
  c.data.dataset = 'tfds:cifar100'
  return c
