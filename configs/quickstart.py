# pylint: disable=line-too-long
r"""Quick start: a small NiN on scikit-learn's 8x8 digits (embedded, no download).

  python -m nin_jax.main --config=configs/quickstart.py --workdir=runs/quickstart
"""

import ml_collections

from nin_jax import config_lib


def get_config() -> ml_collections.ConfigDict:
  c = config_lib.default_config()
  c.model.preset = 'quickstart'
  c.data.dataset = 'sklearn:digits'
  c.data.preprocessing = 'scale'
  c.data.augment = True
  c.data.translate_pixels = 1
  c.model.weight_init = 'modern'
  c.model.batch_norm = True       # Without it this small net can stall at ln(10).
  c.train.batch_size = 64
  # 8x8 images: splitting a batch over virtual CPU devices only adds overhead
  # (measured: 26 s on 1 device, 29 s on 2, 46 s on 8).
  c.runtime.cpu_devices = 1
  c.train.eval_batch_size = 360
  c.train.num_epochs = 40.0
  c.optim.learning_rate = 0.1
  c.optim.weight_decay = 5e-4
  c.optim.last_layer_lr_mult = 1.0
  c.optim.schedule = 'cosine'
  c.optim.warmup_epochs = 1.0
  c.train.log_every_steps = 20
  c.train.eval_every_steps = 0
  c.train.checkpoint_every_steps = 0
  return c
