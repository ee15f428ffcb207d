"""How a run that cannot learn tells its user: the NiN stall warning with its
remedies, and exit status 3 with one line for a non-finite loss."""

import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

from nin_jax import config_lib
from nin_jax import hooks
from nin_jax import metric_writers
from nin_jax import train

REPO = pathlib.Path(__file__).resolve().parents[1]

STALL_WARNING = (
    'Step 3: the loss is stuck at ln(10) = 2.3026 and the logits are all but '
    'equal: the class maps carry no signal (the classic NiN stall, a dead '
    "ReLU on the class maps). Remedies: lower the last layer's rate "
    '(config.optim.last_layer_lr_mult=0.1), lower '
    "config.optim.learning_rate, or use config.model.weight_init='modern' "
    'with config.model.batch_norm=True.')


def test_a_model_stuck_at_ln_classes_is_warned_once_with_the_remedies(
    tmp_path, caplog):
  """The quick start with the author's init and no BatchNorm: its class maps
  start all but silent (every logit about equal), and at learning rate 0.1
  its loss stays at ln(10). The detector needs 3 such log windows: it warns
  at step 3, and only once although step 4 is stalled too."""
  c = config_lib.load_config_file(str(REPO / 'configs' / 'quickstart.py'))
  c.model.weight_init, c.model.batch_norm = 'faithful', False
  c.optim.schedule, c.optim.warmup_epochs = 'constant', 0.0
  c.train.num_train_steps, c.train.log_every_steps = 4, 1
  c.train.eval_every_steps = c.train.checkpoint_every_steps = 1000
  train.train_and_evaluate(c, str(tmp_path / 'run'))
  losses = [r['loss'] for r in metric_writers.read_metrics(
      str(tmp_path / 'run')) if r['split'] == 'train']
  assert len(losses) == 4
  assert all(abs(l - math.log(10)) < 0.01 * math.log(10) for l in losses)
  warnings = [r.getMessage() for r in caplog.records
              if 'NiN stall' in r.getMessage()]
  assert warnings == [STALL_WARNING]


def test_a_nonfinite_loss_exits_with_status_3_and_one_line(tmp_path):
  """`python -m nin_jax.main`: a learning rate warmed up towards 1e30 (the
  quick start's one-epoch warm-up), without BatchNorm, blows the activations
  up within a few steps. The run stops at the first non-finite step with one
  line naming it and the last good checkpoint (a checkpoint after every step:
  the one before it), exit status 3, and nothing non-finite saved."""
  workdir = tmp_path / 'run'
  out = subprocess.run(
      [sys.executable, '-m', 'nin_jax.main', '--config=configs/quickstart.py',
       f'--workdir={workdir}', '--config.model.batch_norm=False',
       '--config.optim.learning_rate=1e30', '--config.train.num_train_steps=6', '--config.train.log_every_steps=1',
       '--config.train.checkpoint_every_steps=1'],
      cwd=REPO, env=dict(os.environ), capture_output=True, text=True,
      timeout=300)
  assert out.returncode == 3, out.stderr[-3000:]
  assert 'Traceback' not in out.stderr
  errors = [l for l in out.stderr.splitlines()
            if l.startswith('nin_jax: error:')]
  assert len(errors) == 1, out.stderr[-3000:]
  # Which step overflows first, and to NaN or Inf, is up to the CPU's
  # kernels; that the step is named with the checkpoint before it is not.
  found = re.fullmatch(
      r'nin_jax: error: Step (\d): loss (\S+), gradient norm (\S+) is not '
      r'finite; stopped\. The last good checkpoint is step (\d) in '
      + re.escape(f'{workdir}/checkpoints') + r'\. Lower '
      r'config\.optim\.learning_rate, or set config\.model\.batch_norm=True\.',
      errors[0])
  assert found, errors[0]
  step, loss, norm, last_good = found.groups()
  assert not (math.isfinite(float(loss)) and math.isfinite(float(norm)))
  assert 1 <= int(step) == int(last_good) < 6
  saved = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir())
  assert saved == list(range(1, int(step) + 1))


@pytest.mark.parametrize('weight_init, batch_norm, remedies', [
    ('modern', True, 'Lower config.optim.learning_rate.'),
    ('modern', False, 'Lower config.optim.learning_rate, or set '
     'config.model.batch_norm=True.'),
    ('faithful', False, "Lower config.optim.learning_rate, or set "
     "config.model.weight_init='modern', or set config.model.batch_norm=True."),
])
def test_nonfinite_remedies_name_only_what_the_model_does_not_use(
    weight_init, batch_norm, remedies):
  c = config_lib.default_config()
  c.model.weight_init, c.model.batch_norm = weight_init, batch_norm
  assert hooks.nonfinite_remedies(c.model) == remedies


def test_a_run_stopped_before_any_save_says_it_has_no_checkpoint():
  assert hooks.last_good_checkpoint(None, 'runs/x') == (
      'none (no checkpoint was saved: the run starts over)')
  assert hooks.last_good_checkpoint(6, 'runs/x') == (
      'step 6 in runs/x/checkpoints')
