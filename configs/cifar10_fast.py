# pylint: disable=line-too-long
r"""NiN on CIFAR-10 for the time-to-accuracy race: the paper's layers, a short-budget recipe.

  python -m nin_jax.main --config=configs/cifar10_fast.py --workdir=runs/cifar10_fast \
      --config.data.dataset=npz:../shared/data/cifar10/cifar10.npz
  python -m experiments.race --framework=both --minutes=55 --out=runs/race

The layers, widths, pooling and GAP head are the paper's CIFAR-10 NiN. What
differs is the training recipe, each an ordinary choice for a budget of a few
epochs (experiments/race.py plans the step count from the minutes it is given):
  BatchNorm + He init  instead of the author's N(0, 0.05) (which stalls at first)
  one-cycle schedule   to learning rate 0.1 (optax.cosine_onecycle_schedule, the
                       same curve as PyTorch's OneCycleLR), SGD with Nesterov
                       momentum 0.9, weight decay 5e-4 on weights only
  no dropout           the paper's 0.5 between blocks regularizes runs of
                       hundreds of epochs; in a few epochs it only slows
  label smoothing 0.1  and test-time flip averaging (the mean logits of each test
                       image and its mirror)
  standardize          per-channel mean/std instead of GCN + ZCA, with pad-4
                       translation + horizontal flip augmentation
"""

import ml_collections

from nin_jax import config_lib


def get_config() -> ml_collections.ConfigDict:
  c = config_lib.default_config()
  c.data.dataset = 'tfds:cifar10'
  c.data.preprocessing = 'standardize'
  c.data.augment = True
  c.data.translate_pixels = 4
  c.data.flip = True
  c.model.preset = 'cifar10'
  c.model.weight_init = 'modern'
  c.model.batch_norm = True
  c.model.dropout_rate = 0.0
  c.optim.optimizer = 'nesterov'
  c.optim.schedule = 'one_cycle'
  c.optim.learning_rate = 0.1
  c.optim.momentum = 0.9
  c.optim.weight_decay = 5e-4
  c.optim.bias_lr_mult = 1.0
  c.optim.last_layer_lr_mult = 1.0
  c.train.batch_size = 128
  c.train.eval_batch_size = 500
  c.train.num_epochs = 10.0
  c.train.label_smoothing = 0.1
  c.train.eval_flip = True
  c.train.log_every_steps = 100
  return c
