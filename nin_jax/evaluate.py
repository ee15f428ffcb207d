r"""Evaluates a workdir's checkpoint: `python -m nin_jax.evaluate --workdir=W`.

  python -m nin_jax.evaluate --workdir=W [--step=S] [--split=test]

Restores the newest (or the given) checkpoint onto the devices present and
evaluates it as the training run does (inference.evaluate) on the run's
evaluation split or `--split` ('test', 'validation' for a run with
config.data.validation_split, 'train'); prints one JSON line: loss, accuracy,
top5_accuracy (more than 5 classes), error, examples, step. `--dataset` and
`--data_dir` say where the data is now, if it moved. `--flip` / `--noflip`
evaluate with or without test-time mirror averaging (default: as the run
did, config.train.eval_flip).
"""

import json
import re

from absl import app
from absl import flags

from nin_jax import cli
from nin_jax import errors
from nin_jax import inference
from nin_jax import input_pipeline
from nin_jax import runtime

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'A training (or caffe_import) workdir.')
flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')
flags.DEFINE_enum('split', '', ('',) + input_pipeline.SPLITS,
                  "Split to evaluate ('': the one the run evaluated).")
flags.DEFINE_string('dataset', None, 'Overrides config.data.dataset (npz:PATH, '
                    'tfds:NAME).')
flags.DEFINE_string('data_dir', None, 'Overrides config.data.data_dir (TFDS).')
flags.DEFINE_bool('flip', None, 'Average the logits of each image and its '
                  'mirror (default: as the run did, config.train.eval_flip).')
flags.mark_flags_as_required(['workdir'])

# The data errors name the training command's fields and flags
# (--config.data.dataset=...); this command's flags for them are these.
_DATA_FIELD = re.compile(r'(?:--)?config\.data\.(dataset|data_dir)\b')


def with_evaluate_flags(message: str) -> str:
  """`message` with config.data.dataset and config.data.data_dir (and their
  --config. flags, which this command rejects) named as --dataset and
  --data_dir."""
  return _DATA_FIELD.sub(r'--\1', message)


def main(argv):
  cli.check_no_arguments(argv)
  overrides = {name: FLAGS[name].value for name in ('dataset', 'data_dir')
               if FLAGS[name].value is not None}
  with cli.user_errors():
    c = inference.read_config(FLAGS.workdir)
    # Before JAX starts: the training run's split over virtual CPU devices.
    runtime.configure_cpu_for(c)
    try:
      result = inference.evaluate(FLAGS.workdir, FLAGS.step, FLAGS.split,
                                  FLAGS.flip, **overrides)
    except (errors.ConfigError, errors.DataError) as e:
      raise type(e)(with_evaluate_flags(str(e))) from None
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
