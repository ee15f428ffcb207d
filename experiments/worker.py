r"""Runs one function of an experiment module in a process of its own.

  python -m experiments.worker experiments.race:train_torch '{"steps": 10, ...}'

The JSON object's items are the function's keyword arguments; what it returns
(if not None) is printed as the last line of stdout, as JSON. Scripts start
it with `common.worker_command` or `common.call_in_process`, in the
repository root, so that the framework timed or trained there shares no
process with the script or the other framework.
"""

from __future__ import annotations

import importlib
import json
import sys


def main(argv: list[str]) -> None:
  if len(argv) != 3:
    sys.exit(f'usage: python -m experiments.worker MODULE:FUNCTION JSON '
             f'(got {argv[1:]})')
  module, _, name = argv[1].partition(':')
  function = getattr(importlib.import_module(module), name)
  result = function(**json.loads(argv[2]))
  if result is not None:
    print(json.dumps(result), flush=True)


if __name__ == '__main__':
  main(sys.argv)
