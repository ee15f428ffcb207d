"""`--distributed`: when nin_jax joins JAX's distributed runtime, and how.

README: `--distributed=auto` (default) joins when a coordinator is given or a
multi-process SLURM/Open MPI job is detected (runtime.py also reads a Cloud
TPU pod's worker list and JAX_COORDINATOR_ADDRESS); `on` always calls
`jax.distributed.initialize()`; `off` never joins. CPU processes given a
coordinator talk through gloo.

Everything here runs in this process against a recording stub of
`jax.distributed.initialize`: no runtime is started and no device is touched.
The real multi-process runs are in test_multiprocess.py.
"""

from absl import flags
from absl.testing import flagsaver
import jax
import pytest

from nin_jax import cli
from nin_jax import main
from nin_jax import runtime

from helpers import REPO

# What the environment can say about a cluster; cleared before each test so
# the caller's environment (a SLURM allocation, say) decides nothing.
CLUSTER_VARIABLES = ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE',
                     'TPU_WORKER_HOSTNAMES', 'JAX_COORDINATOR_ADDRESS')
GLOO = 'jax_cpu_collectives_implementation'
QUICKSTART = str(REPO / 'configs' / 'quickstart.py')


@pytest.fixture
def joined(monkeypatch):
  """The argument tuples `jax.distributed.initialize` was called with.

  Also clears the cluster variables, pins JAX to the CPU, starts the CPU
  collectives setting at None (this JAX's default is already 'gloo', which
  would hide whether runtime.py chose it) and restores both afterwards.
  """
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize',
                      lambda *args, **kwargs: calls.append((args, kwargs)))
  # initialize() logs the process index and count; stubbed so that logging
  # them initializes no backend.
  monkeypatch.setattr(jax, 'process_index', lambda: 0)
  monkeypatch.setattr(jax, 'process_count', lambda: 1)
  for name in CLUSTER_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  saved = jax.config.jax_platforms, getattr(jax.config, GLOO)
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update(GLOO, None)
  yield calls
  jax.config.update('jax_platforms', saved[0])
  jax.config.update(GLOO, saved[1])


@pytest.mark.parametrize('name, value', [
    ('SLURM_NTASKS', '4'),
    ('OMPI_COMM_WORLD_SIZE', '2'),
    ('TPU_WORKER_HOSTNAMES', 'tpu-0,tpu-1'),
    ('JAX_COORDINATOR_ADDRESS', '10.0.0.2:1234'),
])
def test_auto_joins_a_detected_multi_process_job(name, value, joined,
                                                 monkeypatch):
  monkeypatch.setenv(name, value)
  runtime.initialize(mode='auto')
  # No arguments: JAX's own cluster detection fills them in.
  assert joined == [((None, None, None), {})]
  # No coordinator was given, so the collectives are left to JAX.
  assert getattr(jax.config, GLOO) is None


@pytest.mark.parametrize('name, value', [
    (None, None),
    ('SLURM_NTASKS', '1'),
    ('OMPI_COMM_WORLD_SIZE', '1'),
    ('TPU_WORKER_HOSTNAMES', 'tpu-0'),
    ('JAX_COORDINATOR_ADDRESS', ''),
])
def test_auto_stays_a_single_process_without_a_cluster(name, value, joined,
                                                       monkeypatch):
  if name:
    monkeypatch.setenv(name, value)
  runtime.initialize(mode='auto')
  assert joined == []
  assert getattr(jax.config, GLOO) is None


def test_auto_joins_an_explicit_coordinator_with_gloo_on_cpu(joined):
  runtime.initialize('127.0.0.1:1234', 2, 1, mode='auto')
  assert joined == [(('127.0.0.1:1234', 2, 1), {})]
  assert getattr(jax.config, GLOO) == 'gloo'


def test_gloo_only_for_cpu_processes(joined):
  jax.config.update('jax_platforms', 'tpu')
  runtime.initialize('10.0.0.2:1234', 4, 0, mode='on')
  assert joined == [(('10.0.0.2:1234', 4, 0), {})]
  assert getattr(jax.config, GLOO) is None


def test_on_always_joins(joined):
  runtime.initialize(mode='on')
  assert joined == [((None, None, None), {})]
  assert getattr(jax.config, GLOO) is None


def test_off_never_joins_even_in_a_cluster(joined, monkeypatch):
  for name in CLUSTER_VARIABLES:
    monkeypatch.setenv(name, 'tpu-0,tpu-1' if name == 'TPU_WORKER_HOSTNAMES'
                       else '10.0.0.2:1234' if name == 'JAX_COORDINATOR_ADDRESS'
                       else '4')
  runtime.initialize('127.0.0.1:1234', 2, 0, mode='off')
  assert joined == []
  assert getattr(jax.config, GLOO) is None


@pytest.mark.parametrize('mode', ['yes', 'ON', ''])
def test_an_unknown_mode_names_the_flag_and_its_values(mode, joined):
  with pytest.raises(ValueError) as error:
    runtime.initialize('127.0.0.1:1234', 2, 0, mode=mode)
  assert str(error.value) == (f'--distributed={mode!r}: must be one of '
                              "('auto', 'on', 'off').")
  assert joined == []


# --------------------------------------------------- the command line --

class Stop(Exception):
  """Raised by the stubbed runtime.initialize: main() goes no further."""


@pytest.fixture
def absl_flags():
  """nin_jax.main's global absl flags, their values and parsed state restored
  after the test."""
  was_parsed = flags.FLAGS.is_parsed()
  with flagsaver.flagsaver():
    yield flags.FLAGS
  if not was_parsed:
    flags.FLAGS.unparse_flags()


@pytest.fixture
def run_main(absl_flags, monkeypatch):
  """Runs nin_jax.main.main on a command line with runtime.configure_cpu and
  runtime.initialize stubbed; returns (what it called, in order, as
  ('configure_cpu', args) and ('initialize', args); exit status or None).

  The stubbed initialize raises `failure` (default Stop, which ends main()
  there).
  """
  calls = []
  monkeypatch.setattr(runtime, 'configure_cpu',
                      lambda *args: calls.append(('configure_cpu', args)))

  def run(*argv, failure=Stop):
    calls.clear()
    def initialize(*args):
      calls.append(('initialize', args))
      raise failure
    monkeypatch.setattr(runtime, 'initialize', initialize)
    with flagsaver.flagsaver():  # Each command line from the defaults.
      absl_flags(['nin_jax.main', f'--config={QUICKSTART}',
                  '--workdir=unused', *argv])
      try:
        main.main(['nin_jax.main'])
      except Stop:
        return list(calls), None
      except SystemExit as e:
        return list(calls), e.code
    raise AssertionError('main() went past runtime.initialize')

  return run


def test_the_distributed_flag_reaches_initialize(run_main):
  cpu_split = ('configure_cpu', ((64, 360), 1))  # quickstart's batch sizes.
  assert run_main() == ([cpu_split,
                         ('initialize', (None, None, None, 'auto'))], None)
  assert run_main('--distributed=off') == (
      [cpu_split, ('initialize', (None, None, None, 'off'))], None)
  # Joining: the device count is left to the cluster, not split on the CPU.
  assert run_main('--distributed=on') == (
      [('initialize', (None, None, None, 'on'))], None)
  assert run_main('--coordinator_address=127.0.0.1:1234',
                  '--num_processes=2', '--process_id=1') == (
                      [('initialize', ('127.0.0.1:1234', 2, 1, 'auto'))], None)


def test_a_failed_join_is_one_line_naming_the_flags(run_main, capsys):
  calls, status = run_main('--distributed=on',
                           failure=RuntimeError('connection refused'))
  assert (calls, status) == ([('initialize', (None, None, None, 'on'))], 2)
  assert capsys.readouterr().err == (
      'nin_jax: error: joining the distributed runtime failed (connection '
      'refused); check --coordinator_address, --num_processes and '
      '--process_id.\n')


def test_an_unknown_distributed_value_is_refused_by_the_parser(absl_flags,
                                                              capsys):
  assert absl_flags['distributed'].default == 'auto'
  with pytest.raises(SystemExit) as exit_:
    cli.parse_flags(['nin_jax.main', f'--config={QUICKSTART}',
                     '--workdir=unused', '--distributed=yes'], absl_flags)
  assert exit_.value.code == 2
  assert capsys.readouterr().err == (
      'nin_jax: error: --distributed=yes: value should be one of '
      '<auto|on|off>\n')
