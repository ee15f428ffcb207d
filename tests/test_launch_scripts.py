"""experiments/tpu_pod.sh and experiments/slurm_gpu.sbatch, run against
stand-ins: a `gcloud` that records its arguments and runs an `ssh
--worker=all` command once per simulated TPU VM worker (a local process
with that worker's home directory), and `python`, `pip`, `git` and
`hostname` that record what they were asked. What each action sends to each
worker is checked; the runs' own distributed start is the multi-process
tests' (tests/test_multiprocess.py)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKERS = 2

GCLOUD = f'''#!{sys.executable}
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ['STANDIN_LOG'], 'a') as f:
  f.write(json.dumps(['gcloud', *args]) + '\\n')
if args[:4] == ['compute', 'tpus', 'tpu-vm', 'ssh']:
  assert '--worker=all' in args, args
  command = next(a.split('=', 1)[1] for a in args if a.startswith('--command='))
  for i in range({WORKERS}):
    home = os.path.join(os.environ['STANDIN_ROOT'], f'worker{{i}}')
    env = {{**os.environ, 'HOME': home, 'STANDIN_WORKER': str(i)}}
    code = subprocess.run(['bash', '-c', command], cwd=home, env=env).returncode
    if code:
      sys.exit(code)
'''

# A training process: records its arguments, then runs until SIGTERM, when
# it "saves" (a log line) and exits 0, as nin_jax.main does.
PYTHON = f'''#!{sys.executable}
import json, os, signal, sys, time
with open(os.path.join(os.environ['HOME'], 'python_args.json'), 'w') as f:
  json.dump(sys.argv[1:], f)
def stop(*_):
  print('SIGTERM: saved step 7; exiting.', flush=True)
  sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print('training', flush=True)
time.sleep(120)
'''

RECORDER = f'''#!{sys.executable}
import json, os, sys
with open(os.path.join(os.environ['HOME'], os.path.basename(sys.argv[0]) + '_args.json'), 'a') as f:
  f.write(json.dumps(sys.argv[1:]) + '\\n')
if os.path.basename(sys.argv[0]) == 'git' and sys.argv[1] == 'clone':
  os.makedirs(sys.argv[-1], exist_ok=True)
'''

HOSTNAME = '#!/usr/bin/env bash\necho "worker$STANDIN_WORKER"\n'


@pytest.fixture
def pod(tmp_path):
  """run(ACTION, *args, **env) -> CompletedProcess of tpu_pod.sh with the
  stand-ins first on PATH; `.log()` the gcloud calls; `.home(i)` worker i's
  home directory (each with a nin-jax checkout folder)."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for name, text in (('gcloud', GCLOUD), ('python', PYTHON), ('pip', RECORDER),
                     ('git', RECORDER), ('hostname', HOSTNAME)):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  for i in range(WORKERS):
    (tmp_path / 'workers' / f'worker{i}' / 'nin-jax').mkdir(parents=True)
  log = tmp_path / 'gcloud.jsonl'
  base = {**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}',
          'STANDIN_LOG': str(log), 'STANDIN_ROOT': str(tmp_path / 'workers'),
          'HOME': str(tmp_path / 'workers' / 'worker0'),
          'TPU_NAME': 'nin-v4-16', 'ZONE': 'us-central2-b',
          'ACCELERATOR': 'v4-16', 'BUCKET': 'gs://nin-bucket',
          'REPO_URL': 'https://example.com/nin-jax.git'}

  class Pod:
    def run(self, *args, **env):
      return subprocess.run(['bash', str(REPO / 'experiments' / 'tpu_pod.sh'),
                             *args], env={**base, **env}, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)

    def log(self):
      return ([json.loads(l) for l in log.read_text().splitlines()]
              if log.exists() else [])

    def home(self, i):
      return tmp_path / 'workers' / f'worker{i}'

  yield Pod()
  for i in range(WORKERS):  # No stand-in run outlives the test.
    pid_file = tmp_path / 'workers' / f'worker{i}' / 'nin-jax-train.pid'
    if pid_file.exists():
      try:
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
      except (ProcessLookupError, ValueError):
        pass


def wait_for(predicate, seconds=30.0):
  end = time.monotonic() + seconds
  while not predicate():
    assert time.monotonic() < end, 'timed out'
    time.sleep(0.05)


def ssh_command(call):
  assert call[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh'], call
  assert call[5] == 'nin-v4-16' and '--zone=us-central2-b' in call
  assert '--worker=all' in call
  return next(a.split('=', 1)[1] for a in call if a.startswith('--command='))


def test_create_setup_and_a_dry_run(pod):
  out = pod.run('--dry-run', 'create')
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == [
      'gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'nin-v4-16',
      '--zone=us-central2-b', '--accelerator-type=v4-16',
      '--version=tpu-ubuntu2204-base']
  assert pod.log() == []  # A dry run runs nothing.
  assert pod.run('create').returncode == 0
  assert pod.log() == [out.stdout.split()]

  assert pod.run('setup').returncode == 0, out.stderr
  for i in range(WORKERS):
    # One resolver run: jax, jaxlib and libtpu from nin-jax's `tpu` extra,
    # never a separate upgrade of jax.
    assert (pod.home(i) / 'pip_args.json').read_text().splitlines() == [
        json.dumps(['install', '-q', '-e', '.[tpu,tfds,gcs]'])]
    assert json.loads((pod.home(i) / 'git_args.json').read_text()) == [
        'clone', '-q', 'https://example.com/nin-jax.git', 'nin-jax']


def test_the_tpu_extra_pins_jax_within_nin_jaxs_bounds():
  text = (REPO / 'pyproject.toml').read_text()
  assert 'tpu = ["jax[tpu]>=0.10,<0.11"]' in text
  assert '"jax>=0.10,<0.11"' in text


def test_train_detaches_the_same_command_on_every_worker(pod):
  out = pod.run('train', '--config.train.num_epochs=50', "--config.train.seed=3")
  assert out.returncode == 0, out.stderr
  for i in range(WORKERS):
    wait_for(lambda: (pod.home(i) / 'python_args.json').exists())
    assert json.loads((pod.home(i) / 'python_args.json').read_text()) == [
        '-m', 'nin_jax.main', '--config=configs/cifar10_tpu.py',
        '--workdir=gs://nin-bucket/nin_jax/cifar10_tpu', '--distributed=on',
        '--config.data.data_dir=gs://nin-bucket/tensorflow_datasets',
        '--config.train.num_epochs=50', '--config.train.seed=3']
  # The ssh session returned while the runs go on: they are detached.
  status = pod.run('status')
  assert status.returncode == 0
  lines = status.stdout.splitlines()
  for i in range(WORKERS):
    pid = int((pod.home(i) / 'nin-jax-train.pid').read_text())
    assert f'worker{i}: running (pid {pid})' in lines, lines
  # A second train, or a delete, while the runs go on is refused.
  again = pod.run('train')
  assert again.returncode == 2
  assert 'a nin-jax run is going on on nin-v4-16' in again.stderr
  refused = pod.run('delete')
  assert refused.returncode == 2 and "'stop' it first" in refused.stderr
  assert not [c for c in pod.log() if 'delete' in c]

  stop = pod.run('stop')
  assert stop.stdout.splitlines() == [f'worker{i}: SIGTERM sent'
                                      for i in range(WORKERS)]
  for i in range(WORKERS):
    wait_for(lambda: 'saved step 7' in (
        pod.home(i) / 'nin-jax-train.log').read_text())
  wait_for(lambda: 'running (pid' not in pod.run('status').stdout)
  logs = pod.run('logs').stdout
  assert logs.count('SIGTERM: saved step 7; exiting.') == WORKERS
  assert pod.run('delete').returncode == 0
  assert pod.log()[-1] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete',
                           'nin-v4-16', '--zone=us-central2-b', '--quiet']


def test_train_commands_quote_what_they_pass(pod):
  """An argument with spaces or quotes reaches nin_jax.main as one."""
  out = pod.run('--dry-run', 'train', "--config.train.init_from=gs://b/a b's")
  assert out.returncode == 0, out.stderr
  assert pod.log() == []
  assert pod.run('train', "--config.train.init_from=gs://b/a b's"
                 ).returncode == 0
  wait_for(lambda: (pod.home(1) / 'python_args.json').exists())
  args = json.loads((pod.home(1) / 'python_args.json').read_text())
  assert args[-1] == "--config.train.init_from=gs://b/a b's"
  pod.run('stop')


@pytest.mark.parametrize('args, env, message', [
    ((), {}, 'usage: '),
    (('launch',), {}, 'usage: '),
    (('train',), {'BUCKET': '/data/runs'},
     'BUCKET=/data/runs: must be a Cloud Storage URL, gs://NAME'),
    (('train',), {'TPU_NAME': ''}, 'TPU_NAME: set TPU_NAME'),
])
def test_bad_invocations_are_one_line_and_run_nothing(pod, args, env,
                                                      message):
  out = pod.run(*args, **env)
  assert out.returncode != 0
  assert message in out.stderr, out.stderr
  assert pod.log() == []


def test_slurm_script_dry_run_and_usage():
  script = str(REPO / 'experiments' / 'slurm_gpu.sbatch')
  out = subprocess.run(
      ['bash', script, '--dry-run', '--config=configs/cifar10_aug.py',
       '--workdir=/shared/runs/a b', '--config.train.batch_size=512'],
      capture_output=True, text=True, timeout=30)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == (
      'srun --kill-on-bad-exit=1 python -m nin_jax.main --distributed=on '
      '--config=configs/cifar10_aug.py --workdir=/shared/runs/a\\ b '
      '--config.train.batch_size=512')
  for args in ([], ['--config=configs/cifar10_aug.py']):
    out = subprocess.run(['bash', script, *args], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2 and out.stderr.startswith('usage: sbatch '), (
        args, out.stderr)
  # The SLURM settings the docs rely on: SIGTERM two minutes before the
  # limit, one task per GPU.
  text = pathlib.Path(script).read_text()
  assert '#SBATCH --signal=TERM@120' in text
  assert '#SBATCH --ntasks-per-node=8' in text
  assert '#SBATCH --gpus-per-node=8' in text
