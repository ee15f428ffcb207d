r"""The accelerator configs on paper: FLOPs per train step from the trainer's
own lowered step, the images per second a chip needs to be kept busy, and
the host cores that would take to feed it.

  python -m experiments.accelerator_budget \
      --imagenet-per-core=425 --npz-per-core=192000 --json=results/x.json

For `configs/cifar10_tpu.py` and `configs/imagenet.py` (bfloat16): the train
step is built as `train.create_trainer` builds it (one device, the config's
global batch) and lowered; XLA's cost analysis of that module gives its
FLOPs, next to 3x the analytic forward count of experiments/benchmark.py (a
train step is about a forward and two backward passes). For each accelerator
of benchmark.PEAK_TFLOPS asked for, at the model FLOP utilization `--mfu`:
images/s per chip = mfu x peak / FLOPs per image, and host cores per chip =
that / the host input rate per core (`--imagenet-per-core`, `--npz-per-core`,
as experiments/input_benchmark.py measures them on this machine). Nothing
here ran on an accelerator: these are the rates the configs ask for, not
rates measured.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any, Optional

import jax
import numpy as np

from experiments import benchmark
from experiments import provenance
from nin_jax import config_lib
from nin_jax import model_factory
from nin_jax import models
from nin_jax import train

CONFIGS = ('configs/cifar10_tpu.py', 'configs/imagenet.py')
ACCELERATORS = ('TPU v4', 'TPU v5e', 'A100', 'H100')
# Where the peak figures of benchmark.PEAK_TFLOPS for these come from.
PEAK_SOURCES = {
    'TPU v4': 'cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16 per chip',
    'TPU v5e': 'cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16 per chip',
    'A100': 'NVIDIA A100 datasheet: 312 TFLOP/s bf16 dense (SXM)',
    'H100': 'NVIDIA H100 datasheet: 989 TFLOP/s bf16 dense (SXM)',
}


def step_flops(path: str) -> dict[str, Any]:
  """FLOPs of one train step of the config at `path`, its global batch on
  one device: XLA's count of the lowered module and 3x the analytic
  forward."""
  c = config_lib.load_config_file(path)
  c.model.conv_impl = 'xla'  # XLA counts only its own convolutions.
  preset = models.PRESETS[c.model.preset]
  side = c.data.image_size or preset.image_size
  streamed = c.data.dataset == 'tfds:imagenet2012'
  mesh = train.create_mesh(jax.devices()[:1])
  trainer = train.create_trainer(c, (side, side, preset.channels),
                                 c.train.batch_size * 10, mesh=mesh)
  state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      trainer.state)
  batch = {
      'image': jax.ShapeDtypeStruct(
          (c.train.batch_size, side, side, preset.channels),
          np.uint8 if streamed else np.float32,
          sharding=trainer.data_sharding),
      'label': jax.ShapeDtypeStruct((c.train.batch_size,), np.int32,
                                    sharding=trainer.data_sharding)}
  cost = trainer.train_fn.lower(state, batch).cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  forward = benchmark.forward_flops_per_image(
      model_factory.build_model(c.model), side, preset.channels)
  return {'config': path, 'batch': c.train.batch_size, 'image_side': side,
          'dtype': c.model.dtype, 'streamed': streamed,
          'xla_flops_per_image': float(cost['flops']) / c.train.batch_size,
          'analytic_flops_per_image': 3 * forward}


def budget(step: dict[str, Any], mfu: float,
           per_core: dict[str, Optional[float]]) -> list[dict[str, Any]]:
  """One row per accelerator: images/s per chip at `mfu`, and host cores per
  chip at the measured input rate per core (None where not given)."""
  flops = step['xla_flops_per_image']
  rate = per_core['imagenet' if step['streamed'] else 'npz']
  rows = []
  for name in ACCELERATORS:
    peak = benchmark.peak_flops(name, 'bfloat16')
    images = mfu * peak / flops
    rows.append({'accelerator': name, 'peak_tflops': peak / 1e12,
                 'images_per_sec_per_chip': images,
                 'host_cores_per_chip': images / rate if rate else None})
  return rows


def main(argv: Optional[list[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--mfu', type=float, default=0.4,
                      help='model FLOP utilization assumed (default 0.4)')
  parser.add_argument('--imagenet-per-core', type=float, default=None,
                      help='streamed ImageNet images/s per host core')
  parser.add_argument('--npz-per-core', type=float, default=None,
                      help='in-memory batches: images/s per host core')
  parser.add_argument('--json', default='', help='also write this file')
  args = parser.parse_args(argv)
  if not 0 < args.mfu <= 1:
    parser.error(f'--mfu={args.mfu}: must be in (0, 1]')
  per_core = {'imagenet': args.imagenet_per_core, 'npz': args.npz_per_core}
  result = {'mfu': args.mfu, 'host_images_per_sec_per_core': per_core,
            'peak_sources': PEAK_SOURCES, 'configs': []}
  for path in CONFIGS:
    step = step_flops(path)
    step['accelerators'] = budget(step, args.mfu, per_core)
    result['configs'].append(step)
    print(f'{path} ({step["dtype"]}, batch {step["batch"]}, '
          f'{step["image_side"]}x{step["image_side"]}): '
          f'{step["xla_flops_per_image"] / 1e9:.2f} GFLOP per image per '
          f'train step (XLA), {step["analytic_flops_per_image"] / 1e9:.2f} '
          f'(3x the analytic forward)')
    print(f'  {"accelerator":<10}{"peak TFLOP/s":>14}'
          f'{"img/s per chip at " + format(args.mfu, ".0%") + " MFU":>30}'
          f'{"host cores per chip":>22}')
    for row in step['accelerators']:
      cores = row['host_cores_per_chip']
      print(f'  {row["accelerator"]:<10}{row["peak_tflops"]:>14.0f}'
            f'{row["images_per_sec_per_chip"]:>30,.0f}'
            f'{"-" if cores is None else format(cores, ",.1f"):>22}')
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(
        {**result, **provenance.header()}, indent=2) + '\n')


if __name__ == '__main__':
  main()
