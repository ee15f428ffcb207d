# pylint: disable=line-too-long
r"""CIFAR-10 with augmentation on a Cloud TPU pod slice (or any multi-accelerator host).

  # on every worker of the slice (see experiments/tpu_pod.sh):
  python -m nin_jax.main --config=configs/cifar10_tpu.py --workdir=gs://BUCKET/nin/cifar10_tpu \
      --distributed=on --config.data.data_dir=gs://BUCKET/tensorflow_datasets

The paper's model and augmentation (configs/cifar10_aug.py) with bfloat16
compute, a global batch of 1024 (divisible by every slice from 8 to 256 chips)
and the learning rate scaled linearly from the paper's 0.1 at batch 128, with a
5-epoch linear warm-up and cosine decay (Goyal et al., 2017) instead of the
plateau rule, whose epoch-long patience is too coarse at this batch size. Not
yet run on a pod: check the first epochs' loss against a GPU run.
"""

import ml_collections

from nin_jax import config_lib


def get_config() -> ml_collections.ConfigDict:
  c = config_lib.sibling_config(__file__, 'cifar10_aug.py')
  c.model.dtype = 'bfloat16'
  c.train.batch_size = 1024
  c.train.eval_batch_size = 1024
  c.optim.learning_rate = 0.1 * c.train.batch_size / 128
  c.optim.schedule = 'cosine'
  c.optim.warmup_epochs = 5.0
  c.train.checkpoint_every_steps = 500
  c.train.log_every_steps = 50
  return c
