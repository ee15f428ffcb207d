"""The trainer's own train and eval steps, exported for TPU and CUDA from this
CPU-only machine (`jax.export`, platforms=['tpu'] and ['cuda']), on a mesh of
8 simulated devices with the trainer's shardings: no CPU-only call (the
oneDNN plugin's handlers, a host callback) reaches an accelerator's program,
the batch is split along 'data', the state is replicated, and the model
computes in the dtype its config names. This is what can be proven about the
TPU and GPU paths without one; the first real run still has to confirm the
numbers (docs/scaling.md)."""

import json
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]

# Builds each config's trainer (steps as `train.create_trainer` compiles
# them for a run), exports both steps for each platform and prints what the
# test checks, one JSON line per (config, step, platform).
EXPORT_SCRIPT = r'''
import json, re, sys
import jax
import numpy as np
from jax import export
from nin_jax import config_lib, models, train

CPU_ONLY_TARGETS = ('NinConvForward', 'NinConvBackwardData',
                    'NinConvBackwardWeights', 'xla_python_cpu_callback',
                    'xla_ffi_python_cpu_callback', 'xla_python_host_callback')
from nin_jax import conv_select
for entry in sys.argv[1:]:
  path, _, dtype = entry.partition('+')
  c = config_lib.load_config_file(path)
  c.model.dtype = dtype or c.model.dtype
  preset = models.PRESETS[c.model.preset]
  side = c.data.image_size or preset.image_size
  streamed = c.data.dataset == 'tfds:imagenet2012'
  trainer = train.create_trainer(c, (side, side, preset.channels),
                                 num_train_examples=c.train.batch_size * 10)
  state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      trainer.state)
  def batch(size, with_mask):
    images = jax.ShapeDtypeStruct(
        (size, side, side, preset.channels),
        np.uint8 if streamed else np.float32, sharding=trainer.data_sharding)
    labels = jax.ShapeDtypeStruct((size,), np.int32,
                                  sharding=trainer.data_sharding)
    out = {'image': images, 'label': labels}
    if with_mask:
      out['mask'] = jax.ShapeDtypeStruct((size,), np.bool_,
                                         sharding=trainer.data_sharding)
    return out
  steps = {'train': (trainer.train_fn, batch(c.train.batch_size, False)),
           'eval': (trainer.eval_fn, batch(c.train.eval_batch_size, True))}
  # The CPU program of the same step holds the oneDNN calls wherever the
  # plugin runs this dtype here: jax.export refuses to serialize them.
  try:
    export.export(trainer.train_fn, platforms=['cpu'])(
        state, steps['train'][1])
    cpu_refused = ''
  except ValueError as e:
    cpu_refused = str(e)
  print(json.dumps({'config': entry, 'cpu_refused': 'NinConv' in cpu_refused,
                    'onednn': conv_select.onednn_unavailable_reason() is None}),
        flush=True)
  for step, (fn, args) in steps.items():
    for platform in ('tpu', 'cuda'):
      exported = export.export(fn, platforms=[platform])(state, args)
      text = exported.mlir_module()
      leaves = len(jax.tree.leaves(state))
      shardings = exported.in_shardings_jax(trainer.mesh)
      print(json.dumps({
          'config': entry, 'step': step, 'platform': platform,
          'nr_devices': exported.nr_devices,
          'cpu_only': [t for t in CPU_ONLY_TARGETS if t in text],
          'meshes': re.findall(r'sdy\.mesh @\w+ = <([^>]*)>', text),
          'state_specs': sorted({str(getattr(s, 'spec', s)) for s in shardings[:leaves]}),
          'batch_specs': sorted({str(getattr(s, 'spec', s)) for s in shardings[leaves:]}),
          'convolution_types': sorted(set(re.findall(
              r'stablehlo\.convolution.*?->\s*tensor<[^>]*x(\w+)>', text))),
      }), flush=True)
'''

# Both configs as they are (bfloat16 compute), and the CIFAR-10 one in
# float32, the dtype the oneDNN plugin runs on every x86-64 CPU: its CPU
# program holds the plugin's calls, so what the accelerators' programs lack
# is not for want of a plugin in play.
CONFIGS = ('configs/cifar10_tpu.py', 'configs/imagenet.py',
           'configs/cifar10_tpu.py+float32')
DTYPES = {'configs/cifar10_tpu.py': 'bf16', 'configs/imagenet.py': 'bf16',
          'configs/cifar10_tpu.py+float32': 'f32'}


@pytest.fixture(scope='module')
def exports():
  """{(config, step, platform): what the export script found}."""
  out = subprocess.run(
      [sys.executable, '-c', EXPORT_SCRIPT, *CONFIGS], cwd=REPO,
      capture_output=True, text=True, timeout=900,
      env={**__import__('os').environ,
           'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
  assert out.returncode == 0, out.stderr[-4000:]
  rows = [json.loads(line) for line in out.stdout.splitlines()
          if line.startswith('{')]
  cpu = {r['config']: r for r in rows if 'cpu_refused' in r}
  return cpu, {(r['config'], r['step'], r['platform']): r for r in rows
               if 'step' in r}


def test_every_step_exports_for_tpu_and_cuda(exports):
  _, exports = exports
  assert sorted(exports) == sorted(
      (config, step, platform) for config in CONFIGS
      for step in ('train', 'eval') for platform in ('tpu', 'cuda'))
  assert {r['nr_devices'] for r in exports.values()} == {8}


def test_no_cpu_only_call_reaches_an_accelerator(exports):
  """The oneDNN plugin lowers for the CPU backend only; every other
  platform gets XLA's convolution. No host callback either."""
  cpu, exports = exports
  for key, row in exports.items():
    assert row['cpu_only'] == [], key
  float32 = cpu['configs/cifar10_tpu.py+float32']
  assert float32['cpu_refused'] == float32['onednn'], float32


def test_the_batch_is_split_along_data_and_the_state_replicated(exports):
  """What the trainer asks for is what the exported module carries: one
  mesh axis 'data' of 8 devices, every image/label/mask row-split along it,
  parameters, optimizer state and key replicated."""
  _, exports = exports
  for key, row in exports.items():
    assert row['meshes'] == ['["data"=8]'], key
    # The eval step reads no optimizer state or key: those arguments are
    # unused in its module, their sharding unset (None).
    allowed = [['P()']] if key[1] == 'train' else [['None', 'P()']]
    assert row['state_specs'] in allowed, (key, row['state_specs'])
    assert row['batch_specs'] == ["P('data',)"], key


def test_convolutions_compute_in_the_configured_dtype(exports):
  """Both configs name bfloat16 compute (parameters stay float32); the
  float32 variant computes in float32."""
  _, exports = exports
  for key, row in exports.items():
    assert row['convolution_types'] == [DTYPES[key[0]]], (key, row)
