r"""Runs nin_jax.main as N cooperating processes on this machine (loopback).

  python -m experiments.launch_local --num_processes=2 \
      --devices_per_process=2 -- \
      --config=configs/quickstart.py --workdir=runs/quickstart_2x2

Each process gets `--devices_per_process` virtual CPU devices, joins JAX's
distributed runtime on 127.0.0.1 at a free port with CPU (gloo) collectives,
and trains its share of every global batch. Process 0's output is streamed;
the others' goes to WORKDIR-independent log files in --log_dir. If any
process fails, the others are killed and the launcher exits with the first
non-zero status.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _stream(pipe, sink) -> None:
  for line in iter(pipe.readline, ''):
    sink.write(line)
    sink.flush()
  pipe.close()


def launch(main_args: list[str], num_processes: int, devices_per_process: int,
           log_dir: str, timeout: float | None = None,
           entry: tuple[str, ...] = ('-m', 'nin_jax.main')) -> int:
  """Starts the processes, waits, and returns the first non-zero exit status
  (0 if all succeeded). `entry`: what follows `python` (tests wrap main)."""
  port = free_port()
  env = dict(os.environ)
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                      f' --xla_force_host_platform_device_count='
                      f'{devices_per_process}').strip()
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONUNBUFFERED'] = '1'
  os.makedirs(log_dir, exist_ok=True)
  procs, logs, threads = [], [], []
  for i in range(num_processes):
    cmd = [sys.executable, *entry, *main_args,
           f'--coordinator_address=127.0.0.1:{port}',
           f'--num_processes={num_processes}', f'--process_id={i}']
    log = open(os.path.join(log_dir, f'process_{i}.log'), 'w')
    logs.append(log)
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    procs.append(proc)
    sinks = _Tee(log, sys.stdout) if i == 0 else log
    thread = threading.Thread(target=_stream, args=(proc.stdout, sinks),
                              daemon=True)
    thread.start()
    threads.append(thread)
  status = _wait(procs, timeout)
  for thread in threads:
    thread.join(timeout=5)
  for log in logs:
    log.close()
  return status


class _Tee:

  def __init__(self, *sinks):
    self.sinks = sinks

  def write(self, text):
    for s in self.sinks:
      s.write(text)

  def flush(self):
    for s in self.sinks:
      s.flush()


def _kill_all(procs, sig=signal.SIGKILL) -> None:
  for p in procs:
    if p.poll() is None:
      try:
        os.killpg(p.pid, sig)
      except ProcessLookupError:
        pass


def _wait(procs, timeout: float | None) -> int:
  deadline = None if timeout is None else time.time() + timeout
  forward = lambda signum, frame: _kill_all(procs, signal.SIGTERM)
  previous = signal.signal(signal.SIGTERM, forward)
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i, code = failed[0]
        print(f'launch_local: process {i} exited with status {code}; '
              f'stopping the others.', file=sys.stderr)
        _kill_all(procs)
        for p in procs:
          p.wait()
        return code if code > 0 else 128 - code
      if all(c == 0 for c in codes):
        return 0
      if deadline is not None and time.time() > deadline:
        print(f'launch_local: timed out after {timeout} s; killing all '
              f'processes.', file=sys.stderr)
        _kill_all(procs)
        for p in procs:
          p.wait()
        return 124
      time.sleep(0.1)
  finally:
    signal.signal(signal.SIGTERM, previous)


def main() -> None:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument('--num_processes', type=int, default=2)
  parser.add_argument('--devices_per_process', type=int, default=2)
  parser.add_argument('--log_dir', default=None,
                      help='Where process_<i>.log go (default: a temp dir).')
  parser.add_argument('--timeout', type=float, default=None,
                      help='Kill everything after this many seconds.')
  parser.add_argument('main_args', nargs=argparse.REMAINDER,
                      help='-- then the arguments of nin_jax.main.')
  args = parser.parse_args()
  main_args = args.main_args[1:] if args.main_args[:1] == ['--'] else \
      args.main_args
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error('--num_processes and --devices_per_process must be >= 1.')
  if not any(a.startswith('--config') for a in main_args):
    parser.error('give nin_jax.main arguments after --, e.g. '
                 '-- --config=configs/quickstart.py --workdir=runs/x')
  log_dir = args.log_dir or tempfile.mkdtemp(prefix='nin_jax_launch_')
  print(f'launch_local: {args.num_processes} processes x '
        f'{args.devices_per_process} devices; logs in {log_dir}',
        file=sys.stderr)
  sys.exit(launch(main_args, args.num_processes, args.devices_per_process,
                  log_dir, args.timeout))


if __name__ == '__main__':
  main()
