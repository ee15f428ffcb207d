r"""Exports a workdir's model: `python -m nin_jax.export --workdir=W --out=F`.

  python -m nin_jax.export --workdir=W --out=FILE [--platforms=cpu,cuda,tpu]

Writes a serialized `jax.export` artifact of the whole inference function
(inference.export): uint8 images [batch, height, width, channels] as the
dataset stores them (any batch size) in, class probabilities [batch, classes]
out, the saved preprocessing and the weights inside, XLA's convolutions only.
A process with only jax (and flatbuffers) installed runs it:

  exported = jax.export.deserialize(open(FILE, 'rb').read())
  probabilities = exported.call(images)
"""

from absl import app
from absl import flags
from absl import logging
from etils import epath

from nin_jax import cli
from nin_jax import inference

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'A training (or caffe_import) workdir.')
flags.DEFINE_string('out', None, 'The file to write (any epath location).')
flags.DEFINE_list('platforms', ['cpu', 'cuda', 'tpu'],
                  f'Platforms it runs on, of {inference.EXPORT_PLATFORMS}.')
flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')
flags.mark_flags_as_required(['workdir', 'out'])


def main(argv):
  cli.check_no_arguments(argv)
  with cli.user_errors():
    trained = inference.load(FLAGS.workdir, FLAGS.step)
    exported = inference.export(trained, FLAGS.platforms)
    epath.Path(FLAGS.out).write_bytes(exported.serialize())
  logging.info('Wrote %s: step %d, %s -> %s, platforms %s.', FLAGS.out,
               trained.step, exported.in_avals[0].str_short(),
               exported.out_avals[0].str_short(), ','.join(FLAGS.platforms))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
