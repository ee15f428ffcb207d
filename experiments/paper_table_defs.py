"""What each of the paper's tables is: its rows, the paper's test errors and
the config each row runs (experiments/paper_tables.py runs them)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from experiments import common


# The author's model: the ablations compare on it unless --base says otherwise,
# at half the author's learning rate: at 0.1 it stalls at ln(10) here, at 0.05
# it learns (README, Initialization).
AUTHOR_MODEL = 'configs/cifar10.py:faithful'



AUTHOR_FIELDS = (('optim.learning_rate', 0.05),)



@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of a table: its name and workdir key, the paper's test error
  (percent; None where the paper shows it only in a figure), the config it
  runs without --base, and the fields the table varies."""
  name: str
  key: str
  paper_error: Optional[float]
  config: Optional[str] = None
  fields: tuple[tuple[str, Any], ...] = ()



@dataclasses.dataclass(frozen=True)
class Table:
  """A table of the paper. `base`: the config every row runs unless --base
  names one (None: each row's own `config`, and a --base run sets the rows'
  `fields`); `base_fields`: what every row sets on `base` (not on --base)."""
  name: str
  description: str
  variants: tuple[Variant, ...]
  base: Optional[str] = None
  base_fields: tuple[tuple[str, Any], ...] = ()



# Test errors (%) from Lin, Chen & Yan, "Network In Network", ICLR 2014
# (arXiv:1312.4400v3): Table 1 CIFAR-10, Table 2 CIFAR-100, Table 3 SVHN,
# Table 4 MNIST, Table 5 GAP against fully connected heads on CIFAR-10. The
# dropout ablation is Figure 3 (Section 4.2): dropout between the mlpconv
# layers "reduced the test error by more than 20%"; the paper gives no number
# for the model without dropout (the figure only; no copy of the text found
# through the project's search tools states one), so that row's is None. The
# row with dropout is the paper's NIN + Dropout, 10.41% (Table 1).
TABLES = {t.name: t for t in (
    Table('cifar10', 'CIFAR-10 without and with data augmentation '
          '(the paper\'s Table 1)', (
              Variant('NIN + dropout', 'no_augmentation', 10.41,
                      'configs/cifar10.py', (('data.augment', False),)),
              Variant('NIN + dropout + augmentation', 'augmentation', 8.81,
                      'configs/cifar10_aug.py', (('data.augment', True),)))),
    Table('cifar100', 'CIFAR-100 (the paper\'s Table 2)', (
        Variant('NIN + dropout', 'cifar100', 35.68, 'configs/cifar100.py'),)),
    Table('svhn', 'SVHN (the paper\'s Table 3)', (
        Variant('NIN + dropout', 'svhn', 2.35, 'configs/svhn.py'),)),
    Table('mnist', 'MNIST (the paper\'s Table 4)', (
        Variant('NIN + dropout', 'mnist', 0.47, 'configs/mnist.py'),)),
    Table('heads', 'global average pooling against fully connected heads on '
          'CIFAR-10 (the paper\'s Table 5)', (
              Variant('GAP', 'gap', 10.41, None,
                      (('model.head', 'gap'),
                       ('model.head_dropout_rate', 0.0))),
              Variant('fully connected', 'fc', 11.59, None,
                      (('model.head', 'fc'), ('model.head_dropout_rate', 0.0))),
              Variant('fully connected + dropout', 'fc_dropout', 10.88, None,
                      (('model.head', 'fc'),
                       ('model.head_dropout_rate', 0.5)))),
          base=AUTHOR_MODEL, base_fields=AUTHOR_FIELDS),
    Table('dropout', 'dropout between the mlpconv layers on CIFAR-10 (the '
          'paper\'s Figure 3, Section 4.2)', (
              Variant('dropout 0.5', 'dropout', 10.41, None,
                      (('model.dropout_rate', 0.5),)),
              Variant('no dropout', 'no_dropout', None, None,
                      (('model.dropout_rate', 0.0),))),
          base=AUTHOR_MODEL, base_fields=AUTHOR_FIELDS),
)}



@dataclasses.dataclass
class Row:
  """One row to run: the command's parts and, once known, why it is skipped
  and what it reached."""
  variant: Variant
  config: str                       # --config=, as the command has it.
  overrides: dict[str, Any]         # Dotted field -> value, in order.
  workdir: str
  skip: Optional[str] = None        # Why it does not run (not run).
  note: Optional[str] = None        # A change the data forced.
  error: Optional[float] = None     # Test error at the final step, percent.
  steps: Optional[int] = None
  epochs: Optional[float] = None
  wall_seconds: Optional[float] = None

  def command(self, python: str = 'python') -> list[str]:
    """argv of the row's training, run from the repository root."""
    return [python, '-m', 'nin_jax.main', f'--config={self.config}',
            f'--workdir={self.workdir}'] + [
                common.override(k, v) for k, v in self.overrides.items()]
