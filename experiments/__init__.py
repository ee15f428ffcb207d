"""The experiment scripts: run from the repository root as modules.

  python -m experiments.train_mnist --workdir=runs/mnist_real --epochs=2
  python -m experiments.race --framework=jax --minutes=1 --out=/tmp/race

Not part of the installed package (`nin_jax`): a package so the scripts
import each other (`from experiments import common`) and the tests import
them without changing `sys.path`. What they share is in `common` (one-line
errors, `--config.GROUP.FIELD=VALUE` overrides parsed as the launcher parses
them, a run's metrics, a function run in a process of its own through
`python -m experiments.worker`) and `provenance` (the commit, date and machine
every JSON they write carries). Scripts that start others do so as
`python -m ...` in the repository root, so they work from any working
directory.
"""
