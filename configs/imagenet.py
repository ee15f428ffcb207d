# pylint: disable=line-too-long
r"""NiN on ImageNet (ILSVRC-2012), the Caffe model zoo "NIN-Imagenet" layout.

  python -m nin_jax.main --config=configs/imagenet.py --workdir=gs://BUCKET/nin_imagenet
  python -m nin_jax.main --config=configs/imagenet.py:caffe --workdir=gs://BUCKET/nin_imagenet_caffe

Needs a prepared TFDS `imagenet2012` (ArrayRecord) in --config.data.data_dir (README,
"Preparing TFDS data offline"). It is streamed: each process decodes only its
rows of every batch, train images as Inception-style random-resized 224x224
crops with horizontal flips, validation images as the central 224x224 of the
image resized to 256 on its shorter side; pixels are standardized on device
with the fixed ImageNet mean and std.

Variants (`--config=configs/imagenet.py:VARIANT`):
  modern  He init, batch 256, bfloat16, 90 epochs with steps at 30/60/80
  caffe   the zoo's recipe (gist mavenlin/d802a5849de39225bcc6, solver and
          train_val.prototxt): batch 64, base_lr 0.01 divided by 10 every
          200,000 iterations, 450,000 iterations, momentum 0.9, weight decay
          5e-4 (weights only), biases at lr x2, Gaussian init with the file's
          per-layer std (conv1, conv3 and cccp8 0.01, the rest 0.05), float32.
          Its input pipeline stays this one (Caffe squashed images to 256x256,
          took random 224 crops and subtracted the mean image).
"""

import ml_collections

from nin_jax import config_lib

VARIANTS = ('modern', 'caffe')
IMAGENET_TRAIN_IMAGES = 1_281_167
CAFFE_BATCH = 64
CAFFE_STEPS_PER_EPOCH = IMAGENET_TRAIN_IMAGES // CAFFE_BATCH


def get_config(variant: str = 'modern') -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f'configs/imagenet.py:{variant}: variants are {VARIANTS}.')
  c = config_lib.default_config()
  c.model.preset = 'imagenet'
  c.data.dataset = 'tfds:imagenet2012'
  c.data.preprocessing = 'standardize'  # Streamed: the fixed ImageNet mean/std.
  c.data.image_size = 224
  c.data.augment = True                 # Random-resized crops + flips, on the host.
  c.data.translate_pixels = 0           # No device translation for streamed data.
  c.train.batch_size = 256
  c.train.eval_batch_size = 256
  c.train.num_epochs = 90.0
  c.optim.learning_rate = 0.01           # Caffe NIN-Imagenet solver base_lr.
  c.optim.last_layer_lr_mult = 1.0
  c.optim.weight_decay = 5e-4
  c.optim.schedule = 'step'
  c.optim.lr_boundaries_epochs = (30.0, 60.0, 80.0)
  c.model.weight_init = 'modern'
  c.model.batch_norm = False
  c.model.dtype = 'bfloat16'
  c.train.log_every_steps = 100
  c.train.eval_every_steps = 5000
  c.train.checkpoint_every_steps = 2500
  if variant == 'caffe':
    c.train.batch_size = CAFFE_BATCH
    c.train.num_train_steps = 450_000        # max_iter
    c.optim.learning_rate = 0.01             # base_lr, lr_policy "step":
    c.optim.lr_decay = 0.1                   # gamma 0.1 every stepsize 200,000
    c.optim.lr_boundaries_epochs = tuple(    # iterations (in epochs of the full
        step / CAFFE_STEPS_PER_EPOCH   # training split, 20,018 steps each).
        for step in (200_000, 400_000))
    c.optim.momentum = 0.9
    c.optim.weight_decay = 5e-4
    c.optim.bias_lr_mult = 2.0               # blobs_lr 1, 2 on every layer.
    c.optim.last_layer_lr_mult = 1.0
    c.model.weight_init = 'faithful'   # Per-layer std: models.PRESETS.
    c.model.batch_norm = False
    c.model.dtype = 'float32'
  return c
