r"""Times nin-jax's train and eval steps, side by side with a PyTorch NiN.

  python -m experiments.benchmark --preset cifar10 --batch-size 128

The steps are the trainer's own (`train.create_trainer` on the preset's config
file: loss, gradients, optimizer update, dropout, augmentation if the config
has it), run on random data. Each figure is the median over repeated steps
after warm-up, every step ending in `block_until_ready`. When PyTorch is
installed (`pip install -e '.[bench]'`), the PyTorch NiN of
experiments/torch_nin.py runs too, in rounds that alternate with nin-jax's,
and the ratios are printed. By default every round of every framework runs in
a process of its own (`--processes own`: no framework's threads or memory
share a process with the other's; each process compiles and warms up, then
times: `measure_round`, run by `python -m experiments.worker`);
`--processes shared` runs them all in this one process. `--json` prints one
JSON object, with the commit, date and machine (experiments/provenance.py).
Any config field is set with `--config.GROUP.FIELD=VALUE`, as for
`python -m nin_jax.main`.

On the CPU backend the script applies the same automatic settings as
`nin_jax.main` (virtual CPU devices, see nin_jax/runtime.py) unless
`--devices` or XLA_FLAGS says otherwise. On GPU/TPU it reports model FLOP
utilization against the peak table below.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from experiments import common
from experiments import provenance
from nin_jax import layers
from nin_jax import models
from nin_jax import runtime

PRESETS = ('cifar10', 'cifar100', 'svhn', 'mnist', 'imagenet', 'quickstart')

# Dense peak TFLOP/s per JAX device, keyed by a lower-case substring of
# `device_kind` (the longest matching key wins). 'float32' is the peak at JAX's
# default matmul precision: TF32 on NVIDIA Ampere and later, bfloat16 passes
# on TPU.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    'tpu v4': {'bfloat16': 275.0, 'float32': 275.0},
    'tpu v5 lite': {'bfloat16': 197.0, 'float32': 197.0},  # v5e
    'tpu v5e': {'bfloat16': 197.0, 'float32': 197.0},
    'tpu v5': {'bfloat16': 459.0, 'float32': 459.0},  # v5p
    'tpu v6 lite': {'bfloat16': 918.0, 'float32': 918.0},  # v6e
    'tpu v6e': {'bfloat16': 918.0, 'float32': 918.0},
    'a100': {'bfloat16': 312.0, 'float32': 156.0},
    'h100': {'bfloat16': 989.0, 'float32': 495.0},  # SXM
    'h100 pcie': {'bfloat16': 756.0, 'float32': 378.0},
    'l4': {'bfloat16': 121.0, 'float32': 60.0},
    'l40s': {'bfloat16': 362.0, 'float32': 183.0},
    'v100': {'bfloat16': 125.0, 'float32': 15.7},  # bfloat16: fp16 peak
}


def peak_flops(device_kind: str, dtype: str) -> Optional[float]:
  """Peak FLOP/s of one device of `device_kind`, or None if not in the table."""
  kind = device_kind.lower()
  keys = [k for k in PEAK_TFLOPS if k in kind]
  if not keys:
    return None
  return PEAK_TFLOPS[max(keys, key=len)][dtype] * 1e12


# (flag, default, help) of the whole-number flags.
COUNTS = (
    ('--batch-size', 0, "global train batch (default: the config's)"),
    ('--eval-batch-size', 0, 'eval batch (default: --batch-size)'),
    ('--steps', 10, 'timed steps per round and variant'),
    ('--rounds', 3, 'alternating rounds (nin-jax, then each torch)'),
    ('--warmup', 2, None),
    ('--devices', 0, 'virtual CPU devices (default: automatic)'))


def parse_args(argv: list[str]) -> argparse.Namespace:
  """The flags; `overrides`: the --config.GROUP.FIELD=VALUE (field, value)."""
  parser = common.ArgumentParser('benchmark',
                                 description=__doc__.split('\n')[0])
  parser.add_argument('--preset', default='cifar10', choices=PRESETS)
  parser.add_argument('--variant', default='',
                      help="the config file's variant, e.g. 'faithful' for "
                      "configs/cifar10.py:faithful (no BatchNorm)")
  for flag, default, text in COUNTS:
    parser.add_argument(flag, type=int, default=default, help=text)
  parser.add_argument('--dtype', default='', choices=('', 'float32',
                                                      'bfloat16'),
                      help='compute dtype (default: the config\'s)')
  parser.add_argument('--conv-impl', default='',
                      choices=('', 'auto', 'xla', 'onednn'),
                      help="nin-jax's convolutions (default: the config's, "
                      "'auto': oneDNN on CPU)")
  parser.add_argument('--torch', default='all',
                      help="'all', 'none' or a list of eager,compile,bf16")
  parser.add_argument('--processes', default='own',
                      choices=('own', 'shared'),
                      help="'own': each framework's round in a process of its "
                      "own; 'shared': all in this process")
  parser.add_argument('--json', action='store_true',
                      help='print one JSON object instead of a table')
  args, args.overrides = common.parse_args(parser, argv)
  for name in ('steps', 'rounds'):
    if getattr(args, name) < 1:
      parser.error(f'--{name} must be at least 1')
  return args


def configure_devices(args: argparse.Namespace, batch_sizes: tuple[int, ...]
                      ) -> Optional[int]:
  """Applies --devices or the automatic CPU settings before JAX starts."""
  if args.devices:
    jax.config.update('jax_num_cpu_devices', args.devices)
    return args.devices
  return runtime.configure_cpu(batch_sizes)


def load_config(args: argparse.Namespace):
  """The preset's config file with the --config overrides, then the
  benchmark's batch sizes and dtype."""
  variant = f':{args.variant}' if args.variant else ''
  c = common.load_config(f'configs/{args.preset}.py{variant}', args.overrides)
  c.train.batch_size = args.batch_size or c.train.batch_size
  c.train.eval_batch_size = args.eval_batch_size or c.train.batch_size
  c.model.dtype = args.dtype or c.model.dtype
  c.model.conv_impl = args.conv_impl or c.model.conv_impl
  return c


def forward_flops_per_image(model, image_size: int, channels: int) -> float:
  """Multiply-add FLOPs (2 per MAC) of the model's convolutions and head."""
  size, cin, flops = image_size, channels, 0
  for i, block in enumerate(model.blocks):
    last = i == len(model.blocks) - 1
    widths = tuple(block.features) + ((model.num_classes,) if last else ())
    size = (size + 2 * block.padding - block.kernel_size) // block.stride + 1
    for j, width in enumerate(widths):
      k = block.kernel_size if j == 0 else 1
      flops += 2 * size * size * k * k * cin * width
      cin = width
    if block.pool != 'none':
      size = layers.pooled_size(size, block.pool_window, block.pool_stride)
  if model.head == 'fc':
    flops += 2 * size * size * cin * model.num_classes
  return float(flops)


class JaxRunner:
  """nin-jax's compiled train and eval steps on a fixed random batch."""

  def __init__(self, c, compiler_options: Optional[dict[str, Any]] = None):
    from nin_jax import train  # pylint: disable=g-import-not-at-top
    shape = models.PRESETS[c.model.preset].image_shape
    trainer = train.create_trainer(c, shape, c.train.batch_size * 100)
    self.model = trainer.model
    num_classes = self.model.num_classes
    rng = np.random.default_rng(0)

    def put(x):
      return jax.device_put(x, trainer.data_sharding)

    self.train_batch = {
        'image': put(rng.normal(size=(c.train.batch_size, *shape)
                                ).astype(np.float32)),
        'label': put(rng.integers(0, num_classes, c.train.batch_size
                                  ).astype(np.int32))}
    self.eval_batch = {
        'image': put(rng.normal(size=(c.train.eval_batch_size, *shape)
                                ).astype(np.float32)),
        'label': put(rng.integers(0, num_classes,
                                  c.train.eval_batch_size).astype(np.int32)),
        'mask': put(np.ones(c.train.eval_batch_size, bool))}
    self.state = trainer.state
    start = time.perf_counter()
    self.train_fn = trainer.train_fn.lower(self.state, self.train_batch
                                           ).compile(compiler_options)
    self.compile_seconds = time.perf_counter() - start
    self.eval_fn = trainer.eval_fn.lower(self.state, self.eval_batch
                                         ).compile(compiler_options)
    self.flops_per_image = forward_flops_per_image(
        self.model, shape[0], shape[2])

  def xla_forward_flops_per_image(self, eval_batch_size: int
                                  ) -> Optional[float]:
    """XLA's own FLOP count of the eval step, per image (None if unknown)."""
    try:
      cost = self.eval_fn.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      per_device = eval_batch_size / len(jax.devices())
      return float(cost['flops']) / per_device
    except Exception:  # pylint: disable=broad-except
      return None

  def train_step(self) -> None:
    self.state, metrics = self.train_fn(self.state, self.train_batch)
    jax.block_until_ready((self.state, metrics))

  def eval_step(self) -> None:
    jax.block_until_ready(self.eval_fn(self.state, self.eval_batch))


def time_steps(step: Callable[[], Any], steps: int) -> list[float]:
  """Seconds of each of `steps` calls of `step` (which ends in a sync)."""
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return times


def conv_impl(c) -> str:
  """Which library runs nin-jax's convolutions in this process."""
  from nin_jax import conv_select  # pylint: disable=g-import-not-at-top
  uses = (c.model.conv_impl != 'xla' and jax.default_backend() == 'cpu'
          and c.model.dtype in ('float32', 'bfloat16')
          and conv_select.onednn_unavailable_reason() is None)
  return 'onednn' if uses else 'xla'


def torch_variants(choice: str) -> tuple[list[str], Optional[str]]:
  """The torch variants to run and, if torch is missing, why none run."""
  if choice == 'none':
    return [], 'disabled (--torch none)'
  try:
    from experiments import torch_nin  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return [], f'not installed ({e})'
  if choice == 'all':
    return list(torch_nin.VARIANTS), None
  variants = [v.strip() for v in choice.split(',') if v.strip()]
  unknown = set(variants) - set(torch_nin.VARIANTS)
  if unknown:
    raise SystemExit(f'--torch: unknown variants {sorted(unknown)}; choose '
                     f'from {torch_nin.VARIANTS}.')
  return variants, None


def build_torch(c, variants: list[str], warmup: int
                ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
  """Builds and warms up each torch variant; failures are reported.

  Imports torch only when a variant was asked for, so `--torch none` runs
  where torch is not installed.
  """
  runners, info = {}, {}
  if not variants:
    return runners, info
  from experiments import torch_nin  # pylint: disable=g-import-not-at-top
  for variant in variants:
    try:
      runner = torch_nin.TorchRunner(c.model.preset, c.train.batch_size, variant,
                                     batch_norm=c.model.batch_norm)
      start = time.perf_counter()
      runner.train_step()
      runner.eval_step()
      info[variant] = {'compile_seconds': time.perf_counter() - start}
      for _ in range(warmup):
        runner.train_step()
        runner.eval_step()
      runners[variant] = runner
    except Exception as e:  # pylint: disable=broad-except
      info[variant] = {'error': f'{type(e).__name__}: {str(e)[:300]}'}
  return runners, info


def build_jax(args: argparse.Namespace, c) -> tuple[JaxRunner, dict]:
  """nin-jax's runner, compiled and warmed up, and what describes it."""
  auto_devices = configure_devices(
      args, (c.train.batch_size, c.train.eval_batch_size))
  runner = JaxRunner(c)
  for _ in range(args.warmup):
    runner.train_step()
    runner.eval_step()
  device = jax.devices()[0]
  return runner, {
      'compile_seconds': runner.compile_seconds,
      'flops_per_image': runner.flops_per_image,
      'xla_flops_per_image': runner.xla_forward_flops_per_image(
          c.train.eval_batch_size),
      'backend': jax.default_backend(), 'platform': device.platform,
      'device_kind': device.device_kind, 'devices': len(jax.devices()),
      'auto_cpu_devices': auto_devices, 'conv_impl': conv_impl(c)}


def build(args: argparse.Namespace, c, names: list[str]
          ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
  """Runners ('jax' and torch variants), warmed up, and each one's
  description (a torch variant that fails to build: {'error'} only)."""
  runners, info = {}, {}
  if 'jax' in names:
    runners['jax'], info['jax'] = build_jax(args, c)
  variants = [n for n in names if n != 'jax']
  torch_runners, info_torch = build_torch(c, variants, args.warmup)
  if torch_runners:
    import torch  # pylint: disable=g-import-not-at-top
    for variant in torch_runners:
      info_torch[variant]['threads'] = torch.get_num_threads()
  runners.update(torch_runners)
  info.update(info_torch)
  return runners, info


def measure(args: argparse.Namespace, names: list[str]
            ) -> dict[str, dict[str, Any]]:
  """Builds the frameworks `names` in this process, then times --rounds
  rounds alternating between them: each one's description and samples."""
  runners, samples = build(args, load_config(args), names)
  for name in runners:
    samples[name]['train_times'], samples[name]['eval_times'] = [], []
  for _ in range(args.rounds):
    for name, runner in runners.items():
      time.sleep(0.2)  # Let the other framework's threads go idle.
      samples[name]['train_times'] += time_steps(runner.train_step,
                                                 args.steps)
      samples[name]['eval_times'] += time_steps(runner.eval_step, args.steps)
  return samples


def measure_round(options: dict[str, Any], name: str) -> dict[str, Any]:
  """`measure` of the framework `name` for one round, with the flags
  `options` (vars of parse_args' namespace): what a process of its own runs."""
  return measure(argparse.Namespace(**{**options, 'rounds': 1}), [name])


def measure_in_own_process(args: argparse.Namespace, name: str
                           ) -> dict[str, Any]:
  """`measure_round(name)` in a new process, started in the repository root
  (`python -m experiments.worker`); {name: {'error'}} if it fails."""
  try:
    return common.call_in_process(measure_round, options=vars(args),
                                  name=name)
  except common.WorkerError as e:
    return {name: {'error': e.describe(300)}}


def run(args: argparse.Namespace, c) -> dict[str, Any]:
  """Times every framework on config `c`, alternating rounds; returns the
  results."""
  variants, torch_missing = torch_variants(args.torch)
  names = ['jax', *variants]
  samples: dict[str, dict[str, Any]] = {}
  if args.processes == 'own':
    for _ in range(args.rounds):
      for name in names:
        if 'error' in samples.get(name, {}):
          continue
        time.sleep(0.2)
        out = measure_in_own_process(args, name)[name]
        if 'error' in out or name not in samples:
          samples[name] = out
        else:
          for key in ('train_times', 'eval_times'):
            samples[name][key] += out[key]
    if 'error' in samples['jax']:
      raise SystemExit(f'nin-jax: {samples["jax"]["error"]}')
  else:
    samples = measure(args, names)
  return summarize(args, c, samples, torch_missing)


def summarize(args: argparse.Namespace, c, samples: dict[str, dict[str, Any]],
              torch_missing: Optional[str]) -> dict[str, Any]:
  """The result object from each framework's samples (medians, FLOP/s)."""
  jax_ = samples['jax']
  train_ips = c.train.batch_size / statistics.median(jax_['train_times'])
  eval_ips = c.train.eval_batch_size / statistics.median(jax_['eval_times'])
  flops = jax_['flops_per_image']
  train_flops = 3 * flops
  peak = (peak_flops(jax_['device_kind'], c.model.dtype)
          if jax_['platform'] != 'cpu' else None)
  peak = peak * jax_['devices'] if peak else None
  result = {
      'preset': c.model.preset, 'variant': args.variant or 'default',
      'batch_norm': bool(c.model.batch_norm), 'batch_size': c.train.batch_size,
      'eval_batch_size': c.train.eval_batch_size, 'dtype': c.model.dtype,
      'backend': jax_['backend'], 'device_kind': jax_['device_kind'],
      'devices': jax_['devices'], 'auto_cpu_devices': jax_['auto_cpu_devices'],
      'conv_impl': jax_['conv_impl'], 'processes': args.processes,
      'compile_seconds': jax_['compile_seconds'],
      'train_images_per_sec': train_ips, 'eval_images_per_sec': eval_ips,
      'train_step_ms': 1e3 * statistics.median(jax_['train_times']),
      'eval_step_ms': 1e3 * statistics.median(jax_['eval_times']),
      'forward_gflop_per_image': flops / 1e9,
      'xla_forward_gflop_per_image': (jax_['xla_flops_per_image'] or 0) / 1e9
                                     or None,
      'train_gflop_per_sec': train_ips * train_flops / 1e9,
      'eval_gflop_per_sec': eval_ips * flops / 1e9,
      'peak_tflop_per_sec': peak / 1e12 if peak else None,
      'train_mfu': train_ips * train_flops / peak if peak else None,
      'eval_mfu': eval_ips * flops / peak if peak else None,
      'steps': args.steps, 'rounds': args.rounds,
      'timed_steps': len(jax_['train_times']),
      'torch': {}, 'torch_error': torch_missing, 'ratios': {},
      **provenance.header(),
  }
  for variant, info in samples.items():
    if variant == 'jax':
      continue
    info = dict(info)
    if 'train_times' in info:
      info['train_images_per_sec'] = c.train.batch_size / statistics.median(
          info.pop('train_times'))
      # The torch peer evaluates a batch of --batch-size.
      info['eval_images_per_sec'] = c.train.batch_size / statistics.median(
          info.pop('eval_times'))
    result['torch'][variant] = info
  result['ratios'] = ratios(result)
  return result


def ratios(result: dict[str, Any]) -> dict[str, float]:
  """nin-jax over the matching PyTorch figures (>1: nin-jax is faster)."""
  torch_ = {v: r for v, r in result['torch'].items()
            if 'train_images_per_sec' in r}
  out = {}
  if result['dtype'] == 'float32':
    fp32 = [torch_[v]['train_images_per_sec'] for v in ('eager', 'compile')
            if v in torch_]
    if fp32:
      out['train_vs_best_torch_float32'] = (result['train_images_per_sec'] /
                                            max(fp32))
    if 'compile' in torch_:
      out['eval_vs_torch_compile'] = (result['eval_images_per_sec'] /
                                      torch_['compile']['eval_images_per_sec'])
    if 'eager' in torch_:
      out['eval_vs_torch_eager'] = (result['eval_images_per_sec'] /
                                    torch_['eager']['eval_images_per_sec'])
  if result['dtype'] == 'bfloat16' and 'bf16' in torch_:
    out['train_vs_torch_bf16'] = (result['train_images_per_sec'] /
                                  torch_['bf16']['train_images_per_sec'])
    out['eval_vs_torch_bf16'] = (result['eval_images_per_sec'] /
                                 torch_['bf16']['eval_images_per_sec'])
  return out


def print_table(result: dict[str, Any]) -> None:
  """The human-readable report."""
  print(f"{result['preset']} ({result['variant']}, BatchNorm "
        f"{'on' if result['batch_norm'] else 'off'}), batch "
        f"{result['batch_size']} (eval "
        f"{result['eval_batch_size']}), {result['dtype']}, "
        f"{result['devices']} {result['backend']} device(s) "
        f"({result['device_kind']}), {result['conv_impl']} convolutions; "
        f"{result['steps']} steps x "
        f"{result['rounds']} rounds, median; "
        f"{'each framework in its own processes' if result['processes'] == 'own' else 'all in one process'}")
  print(f"forward {result['forward_gflop_per_image']:.3f} GFLOP/image "
        f"(XLA counts {result['xla_forward_gflop_per_image'] or 0:.3f}"
        f"{', without the oneDNN calls' if result['conv_impl'] == 'onednn' else ''}); "
        f"first train step compiles in {result['compile_seconds']:.1f} s")
  header = (f"{'variant':<30} {'train img/s':>11} {'eval img/s':>10} "
            f"{'train GFLOP/s':>13} {'MFU':>6}")
  print(header)
  print('-' * len(header))
  mfu = result['train_mfu']
  print(f"{'nin-jax ' + result['dtype']:<30} "
        f"{result['train_images_per_sec']:>11.1f} "
        f"{result['eval_images_per_sec']:>10.1f} "
        f"{result['train_gflop_per_sec']:>13.1f} "
        f"{f'{100 * mfu:.1f}%' if mfu else '-':>6}")
  names = {'eager': 'torch eager float32', 'compile': 'torch.compile float32',
           'bf16': 'torch eager bf16 autocast'}
  per_image = 3 * result['forward_gflop_per_image']
  for variant, info in result['torch'].items():
    if 'error' in info:
      print(f'{names[variant]:<30} failed: {info["error"]}')
      continue
    print(f"{names[variant]:<30} {info['train_images_per_sec']:>11.1f} "
          f"{info['eval_images_per_sec']:>10.1f} "
          f"{info['train_images_per_sec'] * per_image:>13.1f} {'-':>6}")
  if result['torch_error']:
    print(f"torch: {result['torch_error']}")
  for name, value in result['ratios'].items():
    print(f'{name}: {value:.2f}x')


def main(argv: list[str]) -> None:
  args = parse_args(argv)
  try:
    c = load_config(args)  # A mistake is one line before anything runs.
  except common.UserError as e:
    common.fail('benchmark', str(e))
  result = run(args, c)
  if args.json:
    print(json.dumps(result))
  else:
    print_table(result)


if __name__ == '__main__':
  main(sys.argv[1:])
