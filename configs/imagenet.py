# pylint: disable=line-too-long
r"""NiN on ImageNet (ILSVRC-2012), the Caffe model zoo "NIN-Imagenet" layout.

  python -m nin_jax.main --config=configs/imagenet.py --workdir=gs://BUCKET/nin_imagenet

Needs a prepared TFDS `imagenet2012` (ArrayRecord) in --config.data_dir (README,
"Preparing TFDS data offline"). It is streamed: each process decodes only its
rows of every batch, train images as Inception-style random-resized 224x224
crops with horizontal flips, validation images as the central 224x224 of the
image resized to 256 on its shorter side; pixels are standardized on device
with the fixed ImageNet mean and std.
"""

import ml_collections

from nin_jax import config_lib


def get_config() -> ml_collections.ConfigDict:
  c = config_lib.default_config()
  c.preset = 'imagenet'
  c.dataset = 'tfds:imagenet2012'
  c.preprocessing = 'standardize'  # Streamed: the fixed ImageNet mean/std.
  c.image_size = 224
  c.augment = True                 # Random-resized crops + flips, on the host.
  c.translate_pixels = 0           # No device translation for streamed data.
  c.batch_size = 256
  c.eval_batch_size = 256
  c.num_epochs = 90.0
  c.learning_rate = 0.01           # Caffe NIN-Imagenet solver base_lr.
  c.last_layer_lr_mult = 1.0
  c.weight_decay = 5e-4
  c.schedule = 'step'
  c.lr_boundaries_epochs = (30.0, 60.0, 80.0)
  c.model.weight_init = 'modern'
  c.dtype = 'bfloat16'
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 2500
  return c
