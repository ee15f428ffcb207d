# pylint: disable=line-too-long
r"""NiN on CIFAR-100 without augmentation (the paper's Table 2: 35.68% test error).

  python -m nin_jax.main --config=configs/cifar100.py --workdir=runs/cifar100
  python -m nin_jax.main --config=configs/cifar100.py:faithful --workdir=runs/cifar100_faithful

The layers, preprocessing and schedule are configs/cifar10.py's with 100 class
maps. Variants (`--config=configs/cifar100.py:VARIANT`):
  gap        He init + BatchNorm (default), CIFAR-10's recipe
  faithful   the author's model and solver, from cuda-convnet's
             NIN/cifar-100_def and _params (github.com/mavenlin/cuda-convnet):
             Gaussian init with conv1 N(0, 0.001), cccp1-2 N(0, 0.01), the
             rest N(0, 0.05) (models.PRESETS['cifar100']); no BatchNorm;
             epsW 0.01, epsB 0.02 on every layer (the class maps included)
             with the cost's coeff 2, so learning rate 0.02 (biases x2, class
             maps x1); wc 0.001 applied as wc x epsW per step, which is
             weight decay 5e-4 at learning rate 0.02; momentum 0.9.
"""

import ml_collections

from nin_jax import config_lib

VARIANTS = ('gap', 'faithful')


def get_config(variant: str = 'gap') -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f'configs/cifar100.py:{variant}: variants are {VARIANTS}.')
  c = config_lib.sibling_config(__file__, 'cifar10.py', variant)
  c.model.preset = 'cifar100'
  c.data.dataset = 'tfds:cifar100'
  if variant == 'faithful':
    c.optim.learning_rate = 0.02
    c.optim.bias_lr_mult = 2.0
    c.optim.last_layer_lr_mult = 1.0
    c.optim.weight_decay = 5e-4
    c.optim.momentum = 0.9
  return c
