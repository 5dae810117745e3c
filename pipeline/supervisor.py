"""Exit 0 only from a command that finished: `ckpt-surgery` watches its own work.

A small run works in the launcher's own process, so a `python:` op runs
there: one that calls `os._exit(0)` (or `sys.exit(0)` while `plan` traces
it), a segfault, the OOM killer, would end the command with no report and,
worse, with the exit code the op chose. So the program forks first, before
it imports anything heavy: the child is the command (`cli.main`), the parent
only waits for it. A command that finishes tells the parent its exit code
through a pipe, and the parent exits with it. A child that ends any other way
never makes the parent exit 0: the parent says how the command ended and,
for a run, completes the run's report from the records its checkpoints
saved, failing the others as unfinished (naming them), and exits 1.

The parent leaves ^C to the command (the terminal sends it to both) and
passes on a SIGTERM or SIGHUP; the command dies with the parent (`kill -9`
of the launcher), and its worker processes with it (`worker.exit_when_orphaned`).
Only the standard library is imported here, so the fork copies no thread.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import threading
from typing import Any

_CHANNEL: int | None = None  # in the command's process: the write end of the pipe to its watch
_PR_SET_PDEATHSIG = 1


def tell(**message: Any) -> None:
  """Send the watching parent one message (nothing where none watches)."""
  if _CHANNEL is None:
    return
  data = memoryview((json.dumps(message) + '\n').encode())
  while data:
    data = data[os.write(_CHANNEL, data):]


def started(output: str, run: str, started_at: float, pairs: list[tuple[str, str]],
            spec_text: str, gcs_endpoint: str | None, keep_runs: int) -> None:
  """A run has begun: what the parent needs to report it if its process dies."""
  tell(output=output, run=run, started_at=started_at, pairs=pairs, spec_text=spec_text,
       gcs_endpoint=gcs_endpoint, keep_runs=keep_runs)


def _exit(code: int) -> None:
  """End this process now, output flushed, without Python's interpreter
  teardown, which unloads JAX, Orbax and Beam for about 0.75 s (measured)
  and does nothing a finished command needs."""
  sys.stdout.flush()
  sys.stderr.flush()
  logging.shutdown()
  os._exit(code)  # pylint: disable=protected-access


def _die_with_parent(parent: int) -> None:
  try:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
  except (OSError, AttributeError):  # not Linux: the orphan watch of the workers still holds
    pass
  if os.getppid() != parent:  # the parent died before the line above
    os._exit(1)  # pylint: disable=protected-access


def command() -> None:
  """The `ckpt-surgery` program (and `python -m pipeline`)."""
  if not hasattr(os, 'fork'):
    from pipeline import cli
    _exit(cli.main())
  global _CHANNEL
  read, write = os.pipe()
  parent = os.getpid()
  child = os.fork()
  if child == 0:
    os.close(read)
    _die_with_parent(parent)
    _CHANNEL = write
    from pipeline import cli
    code = cli.main()
    tell(exit=code)
    _exit(code)
  os.close(write)
  _exit(watch(child, read))


def watch(child: int, read: int) -> int:
  """Wait for the command in process `child`, reading its messages from
  `read`; the exit code."""
  messages: list[dict[str, Any]] = []

  def receive():
    with os.fdopen(read, 'rb') as lines:
      for line in lines:
        messages.append(json.loads(line))

  reader = threading.Thread(target=receive, daemon=True, name='messages')
  reader.start()
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C reaches the command itself
  for passed_on in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(passed_on, lambda number, _: os.kill(child, number))
  _, status = os.waitpid(child, 0)
  reader.join(timeout=5.0)  # what it said before it ended is in the pipe
  finished = [m['exit'] for m in messages if 'exit' in m]
  if finished:
    return finished[-1]
  how = _how_it_ended(status)
  runs = [m for m in messages if 'run' in m]
  if runs:
    _report_unfinished(runs[-1], how)
  else:
    print(f'ckpt-surgery: error: the command ended before it finished ({how})', file=sys.stderr)
  return 1


def _how_it_ended(status: int) -> str:
  code = os.waitstatus_to_exitcode(status)
  if code < 0:
    return f'killed by {signal.Signals(-code).name}'
  return f'exit status {code}'


def _report_unfinished(run: dict[str, Any], how: str) -> None:
  """The run's report from the records its checkpoints saved, the others
  failed as unfinished, printed as the command would have printed it."""
  from pipeline import launch, storage
  storage.configure(run['gcs_endpoint'])
  pairs = [tuple(p) for p in run['pairs']]
  launch.report_run(pairs, run['output'], run['run'], run['started_at'], run['spec_text'],
                    trouble=f'the process ended, {how}', keep_runs=run['keep_runs'])
