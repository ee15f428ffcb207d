r"""Times a run's train step from the initial state and from its final
checkpoint, alternating: is a late slowdown the parameters' own?

  XLA_FLAGS=--xla_force_host_platform_device_count=4 \
      python -m experiments.late_steps --workdir=runs/race_55min/jax

The step is experiments/benchmark.py's (the trainer's own, on a fixed random
batch) of the workdir's config. Prints the device count, how many of the
final checkpoint's parameters are subnormal (slow arithmetic on CPUs that do
not flush them to zero), then `--pairs` pairs of lines `initial s/step S`
and `final s/step S`, each the median of `--steps` steps after one untimed.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np

from experiments import benchmark
from experiments import common
from nin_jax import inference


def subnormal_count(params: Any) -> tuple[int, int]:
  """(subnormal values, all values) of the float32 `params` tree."""
  leaves = jax.tree.leaves(params)
  tiny = np.finfo(np.float32).tiny
  subnormal = sum(int(np.sum((np.abs(x) < tiny) & (x != 0))) for x in leaves)
  return subnormal, sum(x.size for x in leaves)


def main(argv: Optional[list[str]] = None) -> None:
  parser = common.ArgumentParser('late_steps',
                                 description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True,
                      help='a training workdir with a checkpoint')
  parser.add_argument('--pairs', type=int, default=3,
                      help='initial/final pairs of timings')
  parser.add_argument('--steps', type=int, default=8,
                      help='timed steps of each timing (median)')
  args = parser.parse_args(argv)
  print('devices:', jax.device_count())
  runner = benchmark.JaxRunner(inference.read_config(args.workdir))
  shardings = jax.tree.map(lambda a: a.sharding, runner.state)
  initial = jax.device_get(runner.state)
  _, variables = inference.read_variables(args.workdir)
  final = initial.replace(params=variables['params'],
                          batch_stats=variables['batch_stats'])
  print('subnormal params in final checkpoint: %d of %d'
        % subnormal_count(variables['params']))
  for name, state in [('initial', initial), ('final', final)] * args.pairs:
    runner.state = jax.device_put(state, shardings)  # The step donates it.
    runner.train_step()
    seconds = np.median(benchmark.time_steps(runner.train_step, args.steps))
    print(name, 's/step', round(float(seconds), 3), flush=True)


if __name__ == '__main__':
  main()
