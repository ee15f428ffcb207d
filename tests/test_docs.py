"""README.md and docs/*.md: length, links, and the commands and paths they quote.

Pure Python over text files (no JAX): every relative link resolves, with its
#anchor; every `--flag` of a quoted `python -m nin_jax.X` or
`python -m experiments.X` command is defined by that module (or one it
imports); every quoted configs/, results/, ... path exists. The checkers are
also run on known-bad snippets, so a check that stops finding problems fails.
"""

from __future__ import annotations

import functools
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README_MAX_LINES = 250

# absl's own flags, accepted by every `python -m nin_jax.X`.
ABSL_FLAGS = frozenset({
    'help', 'helpfull', 'helpshort', 'helpxml', 'flagfile', 'undefok',
    'logtostderr', 'alsologtostderr', 'log_dir', 'v', 'verbosity',
    'stderrthreshold', 'showprefixforinfo', 'logger_levels',
    'only_check_args', 'pdb', 'pdb_post_mortem', 'run_with_pdb',
    'run_with_profiling', 'profile_file', 'use_cprofile_for_profiling'})
# A bare `--` hands the rest of the command line to another module.
PASS_THROUGH = {'experiments.launch_local': 'nin_jax.main'}
# Backquoted text that is a path in the repository.
REPO_PATH = re.compile(
    r'(?:configs|experiments|nin_jax|tests|results|docs)/[\w./-]*')
COMMAND = re.compile(r'python -m ((?:nin_jax|experiments)\.\w+)')
SHELL_SEPARATOR = re.compile(r'&&|\|\||;|\s\|\s|\s#')


def doc_files() -> list[pathlib.Path]:
  return [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]


def _name(path: pathlib.Path) -> str:
  try:
    return str(path.relative_to(ROOT))
  except ValueError:
    return str(path)


def _line(text: str, offset: int) -> int:
  return text.count('\n', 0, offset) + 1


def _is_fence(line: str) -> bool:
  return line.lstrip().startswith('```')


def fenced_blocks(text: str) -> list[tuple[int, list[str]]]:
  """(line number of the first content line, content lines) of each ``` block."""
  blocks, current, start = [], None, 0
  for number, line in enumerate(text.split('\n'), 1):
    if _is_fence(line):
      if current is None:
        current, start = [], number + 1
      else:
        blocks.append((start, current))
        current = None
    elif current is not None:
      current.append(line)
  return blocks


def _blank(match: re.Match) -> str:
  return re.sub(r'[^\n]', ' ', match.group(0))


def prose(text: str) -> str:
  """The text with fenced blocks blanked (offsets and line numbers kept)."""
  lines, inside = [], False
  for line in text.split('\n'):
    if _is_fence(line):
      inside = not inside
      lines.append(' ' * len(line))
    else:
      lines.append(' ' * len(line) if inside else line)
  return '\n'.join(lines)


def inline_code(text: str) -> list[tuple[int, str]]:
  """(offset, content) of each `span` outside fenced blocks."""
  return [(m.start(), m.group(1))
          for m in re.finditer(r'`([^`]+)`', prose(text))]


def slug(heading: str) -> str:
  """GitHub's anchor for a heading."""
  heading = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', heading)  # Link text only.
  heading = re.sub(r'[^\w\- ]', '', heading.strip().lower())
  return heading.replace(' ', '-')


def anchors(text: str) -> set[str]:
  seen: dict[str, int] = {}
  result = set()
  for line in prose(text).split('\n'):
    match = re.match(r'\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$', line)
    if not match:
      continue
    base = slug(match.group(1))
    count = seen.get(base, 0)
    seen[base] = count + 1
    result.add(base if count == 0 else f'{base}-{count}')
  return result


def length_problems(path: pathlib.Path, text: str) -> list[str]:
  lines = len(text.splitlines())
  if lines <= README_MAX_LINES:
    return []
  return [f'{_name(path)}:{README_MAX_LINES + 1}: {lines} lines, over the '
          f'{README_MAX_LINES}-line limit; move a section into a docs/ page '
          'and link it']


def link_problems(path: pathlib.Path, text: str) -> list[str]:
  """Relative links [text](target) or ![alt](target) that do not resolve."""
  problems = []
  # Code spans blanked: `[x](y)` inside backquotes is not a link.
  searchable = re.sub(r'`[^`]+`', _blank, prose(text))
  for match in re.finditer(r'\[[^\]]*\]\(([^)\s]+)(?:\s+"[^"]*")?\)',
                           searchable):
    target = match.group(1)
    if re.match(r'(?:https?|mailto|ftp):', target):
      continue
    where = f'{_name(path)}:{_line(text, match.start())}'
    file_part, _, anchor = target.partition('#')
    if file_part:
      resolved = (path.parent / file_part).resolve()
      if not resolved.exists():
        problems.append(
            f'{where}: link target {target!r} does not exist '
            f'({_name(resolved)}); fix the path, relative to '
            f'{_name(path.parent) or "the repository root"}/, or drop the '
            'link')
        continue
    else:
      resolved = path
    if anchor and resolved.suffix == '.md':
      heading_text = (text if resolved == path
                      else resolved.read_text(encoding='utf-8'))
      if anchor not in anchors(heading_text):
        problems.append(
            f'{where}: link {target!r}: {_name(resolved)} has no heading '
            f'whose anchor is #{anchor}; link an existing heading or add '
            'one')
  return problems


@functools.cache
def _source(module: str) -> str | None:
  path = ROOT / (module.replace('.', '/') + '.py')
  return path.read_text(encoding='utf-8') if path.is_file() else None


def _imports(module: str) -> set[str]:
  """The module and the modules of its package it imports, transitively."""
  package = module.split('.')[0]
  seen, todo = set(), [module]
  while todo:
    name = todo.pop()
    source = _source(name)
    if name in seen or source is None:
      continue
    seen.add(name)
    for match in re.finditer(
        rf'^\s*from {package} import (?:\(([^)]*)\)|([\w ,]+))', source,
        re.M):
      names = (match.group(1) or match.group(2)).split(',')
      todo += [f'{package}.{n.split()[0]}' for n in names if n.split()]
    todo += re.findall(rf'^\s*(?:from|import) ({package}\.\w+)', source, re.M)
  return seen


def flag_defined(module: str, flag: str) -> bool:
  sources = [_source(m) or '' for m in _imports(module)]
  if module.startswith('experiments.'):  # argparse
    quoted = re.compile(rf'''['"]--{re.escape(flag)}['"]''')
    return flag == 'help' or any(quoted.search(s) for s in sources)
  if flag in ABSL_FLAGS:
    return True
  defined = re.compile(rf'''DEFINE_\w*\(\s*['"]{re.escape(flag)}['"]''')
  if any(defined.search(s) for s in sources):
    return True
  boolean = re.compile(
      rf'''DEFINE_bool\w*\(\s*['"]{re.escape(flag[2:])}['"]''')
  return flag.startswith('no') and any(boolean.search(s) for s in sources)


def _commands(text: str) -> list[tuple[int, str]]:
  """(line, command line) of the code in fenced blocks and code spans.

  Continuation lines (ending in a backslash) are joined, also in commented
  commands (`# python -m ... \\` then `#     --flag`)."""
  found = []
  for start, lines in fenced_blocks(text):
    joined, first = '', None
    for number, line in enumerate(lines, start):
      if first is None:
        first, joined = number, line
      else:
        joined += ' ' + re.sub(r'^\s*#?\s*', '', line)
      if joined.endswith('\\'):
        joined = joined[:-1]
        continue
      found.append((first, joined))
      first = None
    if first is not None:
      found.append((first, joined))
  for offset, span in inline_code(text):
    found.append((_line(text, offset), ' '.join(span.split())))
  return found


def command_problems(path: pathlib.Path, text: str) -> list[str]:
  """Quoted commands with a module, flag or config file that does not exist."""
  problems = []
  for line, command in _commands(text):
    where = f'{_name(path)}:{line}'
    for match in re.finditer(r'--(?:config|base)=(configs/[\w./-]+?\.py)\b',
                             command):
      if not (ROOT / match.group(1)).is_file():
        problems.append(f'{where}: {match.group(0)} names a config file that '
                        'does not exist; use one in configs/')
    for match in COMMAND.finditer(command):
      module = match.group(1)
      if _source(module) is None:
        problems.append(f'{where}: python -m {module}: there is no '
                        f'{module.replace(".", "/")}.py; fix the module name')
        continue
      rest = SHELL_SEPARATOR.split(command[match.end():])[0]
      rest = COMMAND.split(rest)[0]  # Up to the next command.
      current = module
      for token in rest.split():
        token = token.strip('[]\'"')
        if token == '--':
          current = PASS_THROUGH.get(current, current)
          continue
        if not token.startswith('--'):
          continue
        flag = token[2:].split('=')[0]
        if flag.startswith('config.') or not flag:
          continue  # --config.GROUP.FIELD=VALUE overrides are checked at run.
        if not flag_defined(current, flag):
          problems.append(
              f'{where}: `python -m {module}` is quoted with --{flag}, which '
              f'{current.replace(".", "/")}.py does not define; use the '
              f'flag\'s name as `python -m {current} --help` lists it')
  return problems


def path_problems(path: pathlib.Path, text: str) -> list[str]:
  """Backquoted repository paths (`results/x.txt`) that do not exist."""
  problems = []
  for offset, span in inline_code(text):
    span = span.strip()
    if not REPO_PATH.fullmatch(span.split(':')[0]) or '*' in span:
      continue
    if not (ROOT / span.split(':')[0]).exists():
      problems.append(f'{_name(path)}:{_line(text, offset)}: `{span}` is not '
                      'a path in the repository; fix it or drop the '
                      'backquotes')
  return problems


CHECKS = (link_problems, command_problems, path_problems)


def test_readme_is_short():
  path = ROOT / 'README.md'
  problems = length_problems(path, path.read_text(encoding='utf-8'))
  assert not problems, '\n'.join(problems)


@pytest.mark.parametrize('check', CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize('path', doc_files(), ids=_name)
def test_docs(path, check):
  problems = check(path, path.read_text(encoding='utf-8'))
  assert not problems, '\n'.join(problems)


def test_every_docs_page_is_linked_from_the_readme():
  readme = (ROOT / 'README.md').read_text(encoding='utf-8')
  missing = [_name(p) for p in doc_files()[1:]
             if f'({_name(p)})' not in readme]
  assert not missing, (f'README.md: no link to {missing}; add them to its '
                       'list of docs pages')


# Known-bad snippets, as if in docs/, each with what its report must say: the
# checkers find these, so they would find the same in the real files.
SCRATCH = ROOT / 'docs' / 'scratch.md'
BAD = [
    (link_problems, '# Title\n\n[data](no_such_page.md)\n', 'scratch.md:3'),
    (link_problems, '[x](training.md#no-such-heading)', '#no-such-heading'),
    (link_problems, '# Title\n[x](#missing)\n', '#missing'),
    (link_problems, '![figure](no_such_figure.png)', 'no_such_figure.png'),
    (link_problems, '[a\nwrapped link](../NO_SUCH.md)', 'NO_SUCH.md'),
    (command_problems,
     '```bash\npython -m nin_jax.main --config=configs/quickstart.py '
     '--worcdir=x\n```', '--worcdir'),
    (command_problems,
     'text\n\n```bash\npython -m nin_jax.evaluate --workdir=x \\\n'
     '    --no_such_flag=1\n```\n', 'scratch.md:4'),
    (command_problems, '`python -m nin_jax.predict --top_k=3\n--topk=2`',
     '--topk'),
    (command_problems, '`python -m nin_jax.evaluate --noworkdir`',
     '--noworkdir'),
    (command_problems,
     '```bash\n# python -m nin_jax.main --workdir=x \\\n#     --bogus=1\n```',
     '--bogus'),
    (command_problems,
     '`python -m nin_jax.main --config=configs/no_such.py:faithful`',
     'configs/no_such.py'),
    (command_problems, '`python -m experiments.no_such --x=1`',
     'experiments/no_such.py'),
    (command_problems, '`python -m nin_jax.no_such --workdir=x`',
     'nin_jax/no_such.py'),
    (command_problems, '`python -m experiments.race --minute=5`', '--minute'),
    (command_problems,
     '`python -m experiments.launch_local --num_processes=2 -- '
     '--config=configs/quickstart.py --num_processes=2 --bogus=1`',
     'nin_jax/main.py does not define'),
    (path_problems, 'see `results/no_such_run.txt`', 'results/no_such_run.txt'),
    (length_problems, 'line\n' * (README_MAX_LINES + 1), 'over the'),
]
GOOD = [
    (link_problems, '[x](training.md#initialization) [y](../README.md) '
     '[z](https://example.com/a.md) [w](#the-caffe-models-nin)\n\n'
     "## The Caffe model's NiN\n\n`[not](a_link.md)`\n"),
    (link_problems, '```\n[in a code block](nowhere.md)\n```\n'),
    (command_problems,
     '```bash\npython -m nin_jax.main --config=configs/cifar10.py:faithful '
     '--workdir=x \\\n    --config.train.batch_size=8 --helpfull\n'
     'python -m nin_jax.evaluate --workdir=x --noflip --flip && ls --color\n'
     '```\n`python -m experiments.benchmark --batch-size 128 '
     '[--variant faithful]` `python -m experiments.train_mnist --epochs=2 '
     '--config.a.b=1` `python -m experiments.launch_local --num_processes=2 -- '
     '--config=configs/quickstart.py --workdir=y`'),
    (path_problems, '`results/` `configs/cifar10.py:fc` `configs/*.py` '
     '`nin_jax/plugins/onednn`'),
    (length_problems, 'line\n' * README_MAX_LINES),
]


@pytest.mark.parametrize('check,text,expected', BAD,
                         ids=lambda v: v.__name__ if callable(v) else None)
def test_checker_reports_a_bad_snippet(check, text, expected):
  problems = check(SCRATCH, text)
  assert len(problems) == 1 and expected in problems[0], problems


@pytest.mark.parametrize('check,text', GOOD,
                         ids=lambda v: v.__name__ if callable(v) else None)
def test_checker_accepts_a_good_snippet(check, text):
  assert check(SCRATCH, text) == []
