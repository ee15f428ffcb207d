r"""Command-line entry point: `python -m nin_jax.main --config=C --workdir=W`.

Intentionally short: it parses flags, joins a multi-process run when asked to,
logs the devices and hands the config to `train.train_and_evaluate`.
Override any config field with `--config.GROUP.FIELD=VALUE` (groups: data,
model, optim, train, runtime). Every user error
(a misspelt field, a bad value, a missing file) is one line on stderr and
exit status 2; a non-finite loss is exit status 3.
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from nin_jax import cli
from nin_jax import config_lib
from nin_jax import errors
from nin_jax import runtime
from nin_jax import train
from nin_jax import validation

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file (configs/*.py).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0, for a multi-process run.')
flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
flags.DEFINE_integer('process_id', None, 'Index of this process.')
flags.DEFINE_enum('distributed', 'auto', runtime.DISTRIBUTED_MODES,
                  "Join JAX's distributed runtime: 'auto' when a coordinator "
                  "is given or a multi-process SLURM/MPI/TPU job is detected, "
                  "'on' always (Cloud TPU pod slices), 'off' never.")
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  cli.check_no_arguments(argv)
  logging.get_absl_handler().addFilter(runtime.QuietLibraries())
  try:
    spec = validation.validate_config(FLAGS.config)
  except config_lib.ConfigError as e:
    cli.fail(str(e))
  if FLAGS.coordinator_address is None and FLAGS.distributed != 'on':
    runtime.configure_cpu_for(FLAGS.config)
  try:
    runtime.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                       FLAGS.process_id, FLAGS.distributed)
  except (ValueError, RuntimeError) as e:
    cli.fail(f'joining the distributed runtime failed ({e}); check '
             '--coordinator_address, --num_processes and --process_id.')
  if jax.process_index() > 0:
    logging.set_verbosity(logging.WARNING)  # One voice: process 0 reports.
  logging.info('Process %d of %d; %d local / %d global devices (%s).',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.default_backend())
  try:
    result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir, spec)
  except cli.USER_ERRORS as e:
    cli.fail(str(e))
  except errors.NonFiniteError as e:
    cli.fail(str(e), status=3)
  logging.info('Done: %s', result)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
