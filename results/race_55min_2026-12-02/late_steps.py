"""Times the race config's train step from its initial state and from the race's final checkpoint."""
import sys, time
sys.path.insert(0, 'experiments')  # run from the repository root
import jax, numpy as np
from nin_jax import inference
import benchmark

workdir = sys.argv[1]
c = inference.read_config(workdir)
print('devices:', jax.device_count())
runner = benchmark.JaxRunner(c)
def timed(n=8):
  runner.train_step(); ts = []
  for _ in range(n):
    s = time.perf_counter(); runner.train_step(); ts.append(time.perf_counter() - s)
  return np.median(ts)
init_state = runner.state
host_init = jax.device_get(init_state)
shard = jax.tree.map(lambda a: a.sharding, init_state)
step, v = inference.read_variables(workdir)
def put(tree, like):
  return jax.tree.map(lambda a, b: jax.device_put(np.asarray(a), b.sharding), tree, like)
final_host = host_init.replace(params=jax.tree.map(np.asarray, v['params']), batch_stats=jax.tree.map(np.asarray, v['batch_stats']))
leaves = jax.tree.leaves(v['params'])
sub = sum(int(np.sum((np.abs(x) < np.finfo(np.float32).tiny) & (x != 0))) for x in leaves)
print('subnormal params in final checkpoint:', sub, 'of', sum(x.size for x in leaves))
for name, st in [('initial', host_init), ('final', final_host)] * 3:
  runner.state = jax.device_put(st, shard)
  print(name, 's/step', round(float(timed()), 3), flush=True)
