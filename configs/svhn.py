# pylint: disable=line-too-long
r"""NiN on SVHN, train + extra, local contrast normalization (Table 3: 2.35%).

  python -m nin_jax.main --config=configs/svhn.py --workdir=runs/svhn
  # the paper's validation set (400 per class of train + 200 per class of extra):
  python -m nin_jax.main --config=configs/svhn.py --workdir=runs/svhn_val \
      --config.data.validation_split=True

Variants (`--config=configs/svhn.py:VARIANT`):
  gap        He init + BatchNorm after every conv (default)
  faithful   the author's N(0, 0.05) init without BatchNorm (not run here)
"""

import ml_collections

from nin_jax import config_lib


VARIANTS = ('gap', 'faithful')


def get_config(variant: str = 'gap') -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f'configs/svhn.py:{variant}: variants are {VARIANTS}.')
  c = config_lib.default_config()
  c.model.preset = 'svhn'
  c.data.dataset = 'tfds:svhn_cropped'
  c.data.preprocessing = 'lcn'
  c.data.use_extra_split = True         # Train on train + extra, as the paper.
  c.data.augment = False
  c.data.flip = False                   # Digits are not mirror-symmetric.
  c.train.batch_size = 128
  c.train.eval_batch_size = 512
  c.train.num_epochs = 40.0
  c.optim.learning_rate = 0.05
  c.optim.last_layer_lr_mult = 0.1
  c.optim.weight_decay = 1e-4
  c.optim.schedule = 'plateau'
  c.optim.plateau_patience_epochs = 4
  # As configs/cifar10.py: the author's N(0, 0.05) init stalls at ln(10) on
  # CIFAR-10 and MNIST here; He init + BatchNorm learns.
  c.model.weight_init = 'modern'
  c.model.batch_norm = True
  c.train.log_every_steps = 100
  if variant == 'faithful':
    c.model.weight_init = 'faithful'
    c.model.batch_norm = False
  return c
