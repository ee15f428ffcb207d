"""The fast recipe's training choices, the PyTorch peer and experiments/race.py.

The race's PyTorch-free parts (its plan, experiments/race_plan.py's checks and
augmentation) run everywhere; only the peer's own steps need PyTorch.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import race
from experiments import race_plan
from nin_jax import config_lib
from nin_jax import train
from nin_jax import validation

REPO = pathlib.Path(__file__).resolve().parents[1]

try:
  import torch  # pylint: disable=g-import-not-at-top
  from experiments import torch_train  # pylint: disable=g-import-not-at-top
except ImportError:
  torch = None

needs_torch = pytest.mark.skipif(
    torch is None, reason="PyTorch is not installed (pip install -e '.[bench]')")


def _batch(n=32, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, 8, 8, 1)).astype(np.float32),
          rng.integers(0, 10, n).astype(np.int32))


def _deterministic(c):
  """The quick-start config without randomness in its train step."""
  c.data.augment = False
  c.model.dropout_rate = 0.0
  c.train.num_train_steps = 10
  return c


# --------------------------------------------------- label smoothing, flips --

def test_label_smoothing_trains_against_the_smoothed_targets(
    quickstart_config):
  c = _deterministic(quickstart_config)
  c.train.label_smoothing = 0.2
  images, labels = _batch()
  trainer = train.create_trainer(c, (8, 8, 1), 320)
  state = trainer.state
  logits, _ = trainer.model.apply(
      {'params': state.params, 'batch_stats': state.batch_stats}, images,
      train=True, mutable=['batch_stats'])
  log_p = np.asarray(jax.nn.log_softmax(logits))
  plain = -log_p[np.arange(32), labels]
  uniform = -log_p.mean(-1)
  expected = np.mean(0.8 * plain + 0.2 * uniform)
  put = lambda x: jax.device_put(x, trainer.data_sharding)
  _, metrics = trainer.train_fn(state, {'image': put(images),
                                        'label': put(labels)})
  assert float(metrics['loss']) == pytest.approx(expected, rel=1e-5)
  assert abs(expected - plain.mean()) > 1e-3  # The smoothing is not a no-op.


def test_eval_flip_makes_predictions_mirror_invariant(quickstart_config):
  c = _deterministic(quickstart_config)
  images, labels = _batch(64)
  mirrored = images[:, :, ::-1]
  sums = {}
  for flip in (False, True):
    c.train.eval_flip = flip
    trainer = train.create_trainer(c, (8, 8, 1), 320)
    put = lambda x, t=trainer: jax.device_put(x, t.data_sharding)
    for name, x in (('image', images), ('mirror', mirrored)):
      out = trainer.eval_fn(trainer.state, {
          'image': put(x), 'label': put(labels),
          'mask': put(np.ones(64, bool))})
      sums[flip, name] = float(out['loss_sum'])
  assert sums[True, 'image'] == pytest.approx(sums[True, 'mirror'], rel=1e-5)
  assert abs(sums[False, 'image'] - sums[False, 'mirror']) > 1e-3


def test_eval_flip_and_label_smoothing_are_validated(quickstart_config):
  c = quickstart_config
  c.train.eval_flip = True
  with pytest.raises(config_lib.ConfigError,
                     match=r'train\.eval_flip=True.*digit dataset.*False'):
    validation.validate_config(c)
  c.train.eval_flip = False
  c.train.label_smoothing = 1.0
  with pytest.raises(config_lib.ConfigError,
                     match=r'train\.label_smoothing=1\.0.*\[0, 1\)'):
    validation.validate_config(c)


def test_the_fast_config_is_valid_and_flips_at_test_time():
  c = config_lib.load_config_file(str(REPO / 'configs' / 'cifar10_fast.py'))
  validation.validate_config(c)
  assert c.train.eval_flip and c.train.label_smoothing > 0
  assert c.optim.schedule == 'one_cycle' and c.model.batch_norm


# ------------------------------------------------------------- race.py --

def _metrics(path, records):
  path.mkdir(parents=True, exist_ok=True)
  (path / 'metrics.jsonl').write_text(
      ''.join(json.dumps(r) + '\n' for r in records))


def test_plan_fits_the_budget():
  assert race.plan(25, 2.0) == 750
  assert race.plan(0.001, 5.0) == 1


def test_jax_curve_joins_each_evaluation_with_its_training_time(tmp_path):
  _metrics(tmp_path, [
      {'step': 10, 'split': 'train', 'epoch': 0.5, 'loss': 2.0,
       'train_seconds': 12.0},
      {'step': 20, 'split': 'train', 'epoch': 1.0, 'loss': 1.0,
       'train_seconds': 20.0},
      {'step': 20, 'split': 'test', 'accuracy': 0.5, 'loss': 1.4},
      {'step': 30, 'split': 'train', 'epoch': 1.5, 'loss': 0.5,
       'train_seconds': 30.0},
      {'step': 35, 'split': 'train', 'epoch': 1.75, 'loss': 0.25,
       'train_seconds': 36.0},
      {'step': 35, 'split': 'test', 'accuracy': 0.75, 'loss': 0.9},
      {'step': 35, 'split': 'test', 'accuracy': 0.1, 'loss': 9.0},  # Again.
  ])
  curve = race.jax_curve(tmp_path)
  assert curve == [
      {'epoch': 1.0, 'step': 20, 'train_seconds': 20.0, 'test_accuracy': 0.5,
       'test_loss': 1.4, 'train_loss': 1.5},
      {'epoch': 1.75, 'step': 35, 'train_seconds': 36.0,
       'test_accuracy': 0.75, 'test_loss': 0.9, 'train_loss': 0.375}]
  assert race.time_to(curve, 0.6) == 36.0
  assert race.time_to(curve, 0.8) is None
  text = race.summary([{'name': 'nin-jax', 'plan': {'steps': 35},
                        'curve': curve}], 0.8)
  assert 'not reached (best 75.00%)' in text


def _race(tmp_path, *args):
  """`python -m experiments.race` in the repository root. Without PYTHONPATH:
  the workers it starts find `experiments` only if it starts them as modules
  in the root too."""
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  return subprocess.run(
      [sys.executable, '-m', 'experiments.race',
       f'--out={tmp_path}', '--config=configs/quickstart.py', '--data=',
       *args], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=600, check=False)


@pytest.mark.slow
def test_race_jax_end_to_end_on_the_quickstart(tmp_path):
  proc = _race(tmp_path, '--framework=jax', '--minutes=0.05', '--target=0.3',
               '--config.train.eval_every_steps=20')
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((tmp_path / 'race_jax.json').read_text())
  steps = result['plan']['steps']
  assert steps == race.plan(0.05, result['plan']['calibration'][
      'seconds_per_step'])
  curve = result['curve']
  assert curve[-1]['step'] == steps
  assert [p['step'] for p in curve] == sorted(p['step'] for p in curve)
  seconds = [p['train_seconds'] for p in curve]
  assert seconds == sorted(seconds) and seconds[0] > 0
  assert result['config']['model']['preset'] == 'quickstart'
  assert result['config']['train']['num_train_steps'] == -1  # The file's.
  assert '--config.train.num_train_steps=%d' % steps in result['command']
  assert (tmp_path / 'race.png').stat().st_size > 5000
  assert 'nin-jax' in proc.stdout and 'time to 30.0%' in proc.stdout
  again = _race(tmp_path, '--framework=jax', '--minutes=0.05')
  assert again.returncode == 0 and 'done already' in again.stderr
  assert json.loads((tmp_path / 'race_jax.json').read_text()) == result


def _refusal(capsys, out, *args):
  """race.main's one error line (asserted to be one, with status 2)."""
  with pytest.raises(SystemExit) as exit_info:
    race.main([f'--out={out}', '--config=configs/quickstart.py', '--data=',
               *args])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('race: error: '), err
  assert not out.exists()  # Nothing written.
  return err


@pytest.mark.parametrize('args, message', [
    (['--minutes=0'], '--minutes must be positive, got 0.0'),
    (['--config.model.presett=cifar10'], "did you mean --config.model.preset"),
    (['--config.train.label_smoothing=2.0'],
     r'config.train.label_smoothing=2.0'),
    (['--config.nothing'], "unrecognized argument '--config.nothing'"),
    (['--set', 'train.seed=1'], "unrecognized argument '--set'"),
])
def test_race_refuses_bad_input_in_one_line(tmp_path, capsys, args, message):
  err = _refusal(capsys, tmp_path / 'out', '--framework=jax', *args)
  assert message in err


def test_race_refuses_a_config_the_peer_cannot_mirror_without_torch(
    tmp_path, capsys, without_torch):
  """The check needs no PyTorch: it runs before the peer is imported."""
  del without_torch
  err = _refusal(capsys, tmp_path / 'out', '--framework=both',
                 '--config.model.head=fc')
  assert ("config.model.head='fc': the PyTorch peer does not mirror it; "
          "use 'gap'.") in err


def test_race_with_torch_says_how_to_install_it(tmp_path, capsys,
                                                without_torch):
  del without_torch
  err = _refusal(capsys, tmp_path / 'out', '--framework=torch')
  assert err == ("race: error: --framework=torch needs PyTorch (pip install "
                 "-e '.[bench]'): No module named 'torch'\n")


# -------------------------------------------------------- the PyTorch peer --

def _copy_into_torch(params, batch_stats, model):
  """nin-jax's params (and BatchNorm statistics) into the TorchNiN."""
  convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
  norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  names = []
  for block in sorted(params, key=lambda k: int(k[len('mlpconv'):])):
    layers = sorted((k for k in params[block] if not k.startswith('bn')),
                    key=lambda k: 0 if k == 'conv' else int(k[len('cccp'):]))
    names += [(block, layer, f'bn{i}') for i, layer in enumerate(layers)]
  assert len(names) == len(convs)
  with torch.no_grad():
    for (block, layer, bn), conv in zip(names, convs):
      p = params[block][layer]
      conv.weight.copy_(torch.from_numpy(
          np.asarray(p['kernel']).transpose(3, 2, 0, 1).copy()))
      if conv.bias is not None:
        conv.bias.copy_(torch.from_numpy(np.array(p['bias'])))
    for (block, _, bn), norm in zip(names, norms):
      for target, source in (
          (norm.weight, params[block][bn]['scale']),
          (norm.bias, params[block][bn]['bias']),
          (norm.running_mean, batch_stats[block][bn]['mean']),
          (norm.running_var, batch_stats[block][bn]['var'])):
        target.copy_(torch.from_numpy(np.array(source)))
  return names


@needs_torch
@pytest.mark.parametrize('batch_norm', [True, False])
def test_the_torch_peer_takes_the_same_steps_as_nin_jax(quickstart_config,
                                                        batch_norm):
  """Same params, same batches: the same losses and the same params after
  three steps (momentum, Nesterov, weight decay, label smoothing, the learning
  rate multipliers and the schedule all at work)."""
  c = _deterministic(quickstart_config)
  c.model.batch_norm = batch_norm
  c.model.weight_init = 'modern' if batch_norm else 'faithful'
  c.optim.optimizer = 'nesterov'
  c.optim.schedule = 'one_cycle'
  c.optim.bias_lr_mult = 2.0
  c.optim.last_layer_lr_mult = 0.5
  c.train.label_smoothing = 0.1
  c.train.num_train_steps = 4  # One-cycle's peak at the second step.
  trainer = train.create_trainer(c, (8, 8, 1), 320)
  peer = torch_train.create_trainer(c, 320, c.train.num_train_steps)
  initial = jax.device_get(trainer.state.params)
  names = _copy_into_torch(initial, jax.device_get(trainer.state.batch_stats),
                           peer.model)
  state = trainer.state
  put = lambda x: jax.device_put(x, trainer.data_sharding)
  for step in range(3):
    images, labels = _batch(64, seed=step)
    state, metrics = trainer.train_fn(state, {'image': put(images),
                                              'label': put(labels)})
    loss = peer.train_step(images, labels)
    assert loss == pytest.approx(float(metrics['loss']), rel=1e-4)
  params = jax.device_get(state.params)
  convs = [m for m in peer.model.modules()
           if isinstance(m, torch.nn.Conv2d)]
  moved = 0.0
  for (block, layer, _), conv in zip(names, convs):
    for key, ours, perm in (('kernel', conv.weight, (2, 3, 1, 0)),
                            ('bias', conv.bias, (0,))):
      if ours is None:
        continue
      update = params[block][layer][key] - initial[block][layer][key]
      np.testing.assert_allclose(
          ours.detach().numpy().transpose(perm) - initial[block][layer][key],
          update, rtol=1e-2, atol=1e-6, err_msg=f'{block}/{layer}/{key}')
      moved = max(moved, np.abs(update).max())
  assert moved > 2e-5  # 20x the tolerance: the updates are compared.
  np.testing.assert_allclose(
      peer.lrs, [float(trainer.schedule(i)) for i in range(4)], rtol=1e-6)


def test_the_torch_augmentation_translates_and_mirrors():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(64, 6, 6, 2)).astype(np.float32)
  same = race_plan.augment(images, rng, 0, False)
  np.testing.assert_array_equal(same, images)
  flipped = race_plan.augment(images, rng, 0, True)
  mirrored = [np.array_equal(f, x[:, ::-1]) for f, x in zip(flipped, images)]
  kept = [np.array_equal(f, x) for f, x in zip(flipped, images)]
  assert all(m or k for m, k in zip(mirrored, kept))
  assert 10 < sum(mirrored) < 54
  shifted = race_plan.augment(images, rng, 2, False)
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
  offsets = set()
  for s, p in zip(shifted, padded):
    found = [(dy, dx) for dy in range(5) for dx in range(5)
             if np.array_equal(s, p[dy:dy + 6, dx:dx + 6])]
    assert found
    offsets.add(found[0])
  assert len(offsets) > 10


def test_the_torch_peer_refuses_what_it_cannot_mirror(quickstart_config):
  c = quickstart_config
  race_plan.check_supported(c)  # The quick start it mirrors.
  c.optim.schedule = 'plateau'
  with pytest.raises(race_plan.UnsupportedConfig,
                     match=r"config\.optim\.schedule='plateau': the PyTorch "
                     r'peer does not mirror it; pick constant, step, cosine '
                     r'or one_cycle\.'):
    race_plan.check_supported(c)
