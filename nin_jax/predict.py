r"""Classifies image files: `python -m nin_jax.predict --workdir=W IMAGE ...`.

  python -m nin_jax.predict --workdir=W [--top_k=5] [--json] IMAGE [IMAGE ...]

PNG or JPEG files, grayscale or colour, any size, are converted to the
model's channels and size and normalized with the statistics saved at
training time (inference.load_image). One line per image, the top k classes
with names and probabilities; with --json, {"path": ..., "top_k": [{"class":
int, "name": str, "probability": float}, ...]}. An unreadable or missing
file is one error line naming it (exit status 2 at the end); the others are
still classified.
"""

import json

from absl import app
from absl import flags

from nin_jax import cli
from nin_jax import inference

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'A training (or caffe_import) workdir.')
flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')
flags.DEFINE_integer('top_k', 5, 'Classes to show per image.', lower_bound=1)
flags.DEFINE_boolean('json', False, 'One JSON object per line.')
flags.mark_flags_as_required(['workdir'])


def format_line(result: dict) -> str:
  """'PATH: NAME 0.9812, NAME 0.0101, ...'; a name that is not the class
  number is followed by the number in brackets."""
  ranked = ', '.join(
      (t['name'] if t['name'] == str(t['class'])
       else f'{t["name"]} [{t["class"]}]') + f' {t["probability"]:.4f}'
      for t in result['top_k'])
  return f'{result["path"]}: {ranked}'


def main(argv):
  if len(argv) < 2:
    cli.fail('name at least one image file: python -m nin_jax.predict '
             '--workdir=W IMAGE [IMAGE ...]')
  failed = False
  with cli.user_errors():
    trained = inference.load(FLAGS.workdir, FLAGS.step)
    for result in inference.classify(trained, argv[1:], FLAGS.top_k):
      if 'error' in result:
        failed = True
        cli.error_line(result['error'])
      else:
        print(json.dumps(result) if FLAGS.json else format_line(result),
              flush=True)
  if failed:
    raise SystemExit(cli.USER_ERROR_STATUS)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
