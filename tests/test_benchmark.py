"""Tests of experiments/benchmark.py and the automatic CPU settings."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from experiments import benchmark
import nin_jax
from nin_jax import runtime

BENCHMARK_FIELDS = ('train_images_per_sec', 'eval_images_per_sec',
                    'compile_seconds', 'preset', 'batch_size', 'dtype',
                    'devices', 'forward_gflop_per_image', 'ratios', 'torch')


def _torch_installed() -> bool:
  return importlib.util.find_spec('torch') is not None


def _benchmark(repo_root, *args, env_updates=()):
  """`python -m experiments.benchmark ARGS --json` in the repository root
  (without PYTHONPATH: the processes it starts find `experiments` only if it
  starts them as modules in the root too); its JSON object."""
  env = {k: v for k, v in os.environ.items()
         if k not in ('XLA_FLAGS', 'PYTHONPATH')}
  env.update(JAX_PLATFORMS='cpu', **dict(env_updates))
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.benchmark', *args, '--json'],
      capture_output=True, text=True, timeout=300, env=env, cwd=repo_root,
      check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_benchmark_quickstart_json_without_torch(repo_root, tmp_path):
  """One launch in the default mode (each framework's rounds in processes of
  their own, started by the benchmark) with the automatic CPU devices: the
  JSON fields, and `--torch none` imports no torch (here any import of it
  fails, in every process: PYTHONPATH reaches them all)."""
  (tmp_path / 'torch').mkdir()
  (tmp_path / 'torch' / '__init__.py').write_text(
      "raise ImportError('torch imported although --torch none')\n")
  result = _benchmark(
      repo_root, '--preset', 'quickstart', '--batch-size', '16', '--steps',
      '1', '--rounds', '2', '--warmup', '0', '--torch', 'none',
      env_updates={'PYTHONPATH': str(tmp_path)})
  for field in BENCHMARK_FIELDS:
    assert field in result, field
  assert result['preset'] == 'quickstart' and result['batch_size'] == 16
  assert result['processes'] == 'own'
  assert result['dtype'] == 'float32'
  assert result['devices'] == result['auto_cpu_devices'] == 8
  assert result['train_images_per_sec'] > 0
  assert result['eval_images_per_sec'] > 0
  assert result['compile_seconds'] > 0
  assert result['train_mfu'] is None  # No peak FLOP/s for CPUs.
  assert result['torch'] == {} and result['ratios'] == {}
  assert result['torch_error'] == 'disabled (--torch none)'
  assert (result['steps'], result['rounds'], result['timed_steps']) == (1, 2, 2)


def test_benchmark_says_torch_is_not_installed(without_torch):
  """Where torch is missing, `--torch all` (the default) times nin-jax alone
  and says why in the result and the table."""
  del without_torch
  variants, error = benchmark.torch_variants('all')
  assert variants == []
  assert error == "not installed (No module named 'torch')"
  assert benchmark.torch_variants('none') == ([], 'disabled (--torch none)')


@pytest.mark.slow
@pytest.mark.skipif(not _torch_installed(),
                    reason="PyTorch is not installed (pip install -e '.[bench]')")
def test_benchmark_times_the_torch_peer_in_one_process(repo_root):
  result = _benchmark(
      repo_root, '--preset', 'quickstart', '--batch-size', '16', '--steps',
      '2', '--rounds', '1', '--warmup', '1', '--torch', 'eager',
      '--processes', 'shared')
  assert result['processes'] == 'shared' and result['torch_error'] is None
  assert result['torch']['eager']['train_images_per_sec'] > 0
  assert result['ratios']['train_vs_best_torch_float32'] > 0


def test_cifar10_forward_flops_are_the_papers_model():
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
