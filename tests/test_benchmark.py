"""Tests of experiments/benchmark.py and the automatic CPU settings."""

import json
import os
import subprocess
import sys

import pytest

from nin_jax import runtime

BENCHMARK_FIELDS = ('train_images_per_sec', 'eval_images_per_sec',
                    'compile_seconds', 'preset', 'batch_size', 'dtype',
                    'devices', 'forward_gflop_per_image', 'ratios', 'torch')


def _torch_installed() -> bool:
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def test_benchmark_quickstart_json(repo_root):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['JAX_PLATFORMS'] = 'cpu'
  torch_variants = 'eager' if _torch_installed() else 'none'
  out = subprocess.run(
      [sys.executable, str(repo_root / 'experiments' / 'benchmark.py'),
       '--preset', 'quickstart', '--batch-size', '16', '--steps', '2',
       '--rounds', '1', '--warmup', '1', '--torch', torch_variants,
       '--processes', 'shared', '--json'],
      capture_output=True, text=True, timeout=120, env=env, check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  for field in BENCHMARK_FIELDS:
    assert field in result, field
  assert result['preset'] == 'quickstart' and result['batch_size'] == 16
  assert result['processes'] == 'shared'
  assert result['dtype'] == 'float32'
  assert result['devices'] == result['auto_cpu_devices'] == 8
  assert result['train_images_per_sec'] > 0
  assert result['eval_images_per_sec'] > 0
  assert result['compile_seconds'] > 0
  assert result['train_mfu'] is None  # No peak FLOP/s for CPUs.
  if torch_variants == 'eager':
    assert result['torch']['eager']['train_images_per_sec'] > 0
    assert result['ratios']['train_vs_best_torch_float32'] > 0
  else:
    assert result['torch_error']


def test_benchmark_without_torch_needs_no_torch(repo_root, tmp_path):
  """`--torch none` must not import torch: here any import of it fails. Runs
  the default mode: each framework's rounds in processes of their own."""
  (tmp_path / 'torch').mkdir()
  (tmp_path / 'torch' / '__init__.py').write_text(
      "raise ImportError('torch imported although --torch none')\n")
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=str(tmp_path))
  out = subprocess.run(
      [sys.executable, str(repo_root / 'experiments' / 'benchmark.py'),
       '--preset', 'quickstart', '--batch-size', '8', '--steps', '1',
       '--rounds', '2', '--warmup', '0', '--torch', 'none', '--devices', '1',
       '--json'],
      capture_output=True, text=True, timeout=120, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['torch'] == {} and 'disabled' in result['torch_error']
  assert result['train_images_per_sec'] > 0
  assert result['processes'] == 'own' and result['devices'] == 1
  assert (result['steps'], result['rounds'], result['timed_steps']) == (1, 2, 2)


def test_cifar10_forward_flops_are_the_papers_model():
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..',
                                  'experiments'))
  import benchmark  # pylint: disable=g-import-not-at-top
  import nin_jax  # pylint: disable=g-import-not-at-top
  flops = benchmark.forward_flops_per_image(nin_jax.create_model('cifar10'),
                                            32, 3)
  assert flops == pytest.approx(0.445e9, rel=2e-3)
  assert benchmark.peak_flops('TPU v5 lite', 'bfloat16') == 197e12
  assert benchmark.peak_flops('NVIDIA H100 PCIe', 'bfloat16') == 756e12
  assert benchmark.peak_flops('cpu', 'float32') is None


def count(environ=None, platforms=None, num_cpu_devices=-1, plugins=(),
          batch_sizes=(128, 500)):
  return runtime.cpu_device_count_to_set(environ or {}, platforms,
                                         num_cpu_devices, plugins, batch_sizes)


def test_cpu_devices_set_when_unset():
  assert count() == 4  # Largest divisor of 128 and 500 up to 8.
  assert count(batch_sizes=(128, 512)) == runtime.DEFAULT_CPU_DEVICES
  assert count(platforms='cpu', batch_sizes=()) == runtime.DEFAULT_CPU_DEVICES
  assert count(environ={'XLA_FLAGS': '--xla_cpu_use_thunk_runtime=true'},
               batch_sizes=(64, 360)) == 8


def test_cpu_devices_left_alone_when_user_chose():
  flags = {'XLA_FLAGS': '--xla_force_host_platform_device_count=3'}
  assert count(environ=flags) is None
  assert count(num_cpu_devices=2) is None
  assert count(batch_sizes=(127, 500)) is None  # Only 1 divides both.


def test_cpu_devices_never_set_off_cpu():
  assert count(platforms='cuda') is None
  assert count(platforms='tpu') is None
  assert count(platforms='cuda,cpu') is None
  assert count(plugins=('xla_cuda12',)) is None


def _device_count_in_subprocess(env_updates: dict[str, str]) -> str:
  env = {k: v for k, v in os.environ.items()
         if k not in ('XLA_FLAGS', 'JAX_NUM_CPU_DEVICES')}
  env.update(env_updates)
  code = ('from nin_jax import runtime; '
          'print(runtime.configure_cpu((128, 512)), end=" "); '
          'import jax; print(jax.device_count())')
  return subprocess.run([sys.executable, '-c', code], env=env, text=True,
                        capture_output=True, timeout=60,
                        check=True).stdout.split()


def test_configure_cpu_applies_before_backend_and_respects_xla_flags():
  assert _device_count_in_subprocess({'JAX_PLATFORMS': 'cpu'}) == ['8', '8']
  assert _device_count_in_subprocess({
      'JAX_PLATFORMS': 'cpu',
      'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}) == ['None',
                                                                    '2']
