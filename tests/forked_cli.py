"""`python -m pipeline ARGS` for tests, forked from a process that has imported it.

A fresh `python -m pipeline` spends about 2.3 s importing JAX, Orbax and Beam
before the command's first line, and the suite runs the command some 150
times on each stack. A multiprocessing forkserver imports them once; each
command is a fork of it that runs exactly as `python -m pipeline` does: its
own process, argv, working directory and environment, stdout and stderr
(files, as a pipe is not a terminal either), exit code. Its worker
processes are started as the command starts them.

Environment variables that JAX, Python or TensorFlow's logging read when
they are imported cannot be changed after the fork: a command whose
environment sets one otherwise than this process's runs as a plain
subprocess instead.
"""
from __future__ import annotations

import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile

_PRELOAD = ['pipeline.supervisor', 'pipeline.cli', 'pipeline.launch', 'pipeline.run', 'pipeline.migrate']
_READ_AT_IMPORT = ('JAX_', 'PYTHON', 'TF_')
_CONTEXT = multiprocessing.get_context('forkserver')
_CONTEXT.set_forkserver_preload(_PRELOAD)
_forkserver_env: dict[str, str] | None = None  # what it imported with: its start's environment


def _forkable(env: dict[str, str]) -> bool:
  imported = os.environ if _forkserver_env is None else _forkserver_env
  keys = {k for k in {*env, *imported} if k.startswith(_READ_AT_IMPORT)}
  return all(env.get(k) == imported.get(k) for k in keys)


def _command(args: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
  """In the fork: become `python -m pipeline ARGS`."""
  os.chdir(cwd)
  os.environ.clear()
  os.environ.update(env)
  for fd, path in ((1, out), (2, err)):
    file = os.open(path, os.O_WRONLY)
    os.dup2(file, fd)
    os.close(file)
  sys.argv = [os.path.join(os.path.dirname(sys.modules['pipeline'].__file__), '__main__.py'), *args]
  runpy.run_module('pipeline', run_name='__main__', alter_sys=True)


def cli(*args, cwd=None, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
  """`python -m pipeline ARGS` (the same program as `ckpt-surgery`), its
  output captured, as `subprocess.run(..., capture_output=True, text=True)`."""
  argv = [str(a) for a in args]
  env = dict(os.environ if env is None else env)
  if not _forkable(env):
    return subprocess.run([sys.executable, '-m', 'pipeline', *argv], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=timeout)
  with tempfile.TemporaryDirectory() as captured:
    out, err = os.path.join(captured, 'stdout'), os.path.join(captured, 'stderr')
    for path in (out, err):
      open(path, 'w').close()
    global _forkserver_env
    if _forkserver_env is None:  # the first fork starts it, with this environment
      _forkserver_env = dict(os.environ)
    process = _CONTEXT.Process(target=_command, args=(argv, str(cwd or os.getcwd()), env, out, err))
    process.start()
    process.join(timeout)
    if process.exitcode is None:
      process.kill()
      process.join()
      raise subprocess.TimeoutExpired(['python', '-m', 'pipeline', *argv], timeout)
    with open(out) as o, open(err) as e:
      return subprocess.CompletedProcess(['python', '-m', 'pipeline', *argv], process.exitcode,
                                         o.read(), e.read())
