# pylint: disable=line-too-long
r"""NiN on SVHN, train + extra, local contrast normalization (Table 4: 2.35%).

  python -m nin_jax.main --config=configs/svhn.py --workdir=runs/svhn
"""

import ml_collections

from nin_jax import config_lib


def get_config() -> ml_collections.ConfigDict:
  c = config_lib.default_config()
  c.preset = 'svhn'
  c.dataset = 'tfds:svhn_cropped'
  c.preprocessing = 'lcn'
  c.augment = False
  c.flip = False                   # Digits are not mirror-symmetric.
  c.batch_size = 128
  c.eval_batch_size = 512
  c.num_epochs = 40.0
  c.learning_rate = 0.05
  c.last_layer_lr_mult = 0.1
  c.weight_decay = 1e-4
  c.schedule = 'plateau'
  c.plateau_patience_epochs = 4
  c.model.weight_init = 'faithful'
  c.log_every_steps = 100
  return c
