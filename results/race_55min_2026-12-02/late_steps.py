"""Times the race config's train step from its initial state and from the race's
final checkpoint, alternating (run from the repository root: WORKDIR is argv[1])."""
import sys
sys.path.insert(0, 'experiments')
import jax
import numpy as np
from nin_jax import inference
import benchmark

workdir = sys.argv[1]
print('devices:', jax.device_count())
runner = benchmark.JaxRunner(inference.read_config(workdir))
shardings = jax.tree.map(lambda a: a.sharding, runner.state)
initial = jax.device_get(runner.state)
_, v = inference.read_variables(workdir)
final = initial.replace(params=v['params'], batch_stats=v['batch_stats'])
leaves = jax.tree.leaves(v['params'])
subnormal = sum(int(np.sum((np.abs(x) < np.finfo(np.float32).tiny) & (x != 0)))
                for x in leaves)
print('subnormal params in final checkpoint:', subnormal, 'of',
      sum(x.size for x in leaves))
for name, state in [('initial', initial), ('final', final)] * 3:
  runner.state = jax.device_put(state, shardings)  # The step donates it.
  runner.train_step()
  print(name, 's/step',
        round(float(np.median(benchmark.time_steps(runner.train_step, 8))), 3),
        flush=True)
