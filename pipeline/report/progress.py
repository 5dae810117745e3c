"""How far a run is: one line, redrawn in place where stdout is a terminal.

The launcher counts the records its workers have saved (a listing, at
growing intervals) and shows the count here. Where stdout is not a terminal
(a scheduler's log, a pipe) it shows nothing: a log wants lines that stay,
and the workers log theirs (one per hundred skips).
"""
from __future__ import annotations

import sys
from typing import TextIO

WIDTH = 30  # characters of bar


def line(saved: int, total: int, elapsed: float) -> str:
  """`[#######.......]  412/1000 checkpoints  2 min 05 s`."""
  filled = WIDTH * saved // total if total else WIDTH
  minutes, seconds = divmod(int(elapsed), 60)
  return (f'[{"#" * filled}{"." * (WIDTH - filled)}] {saved:>{len(str(total))}}/{total} '
          f'checkpoints  {minutes} min {seconds:02d} s')


class Progress:
  """`show` redraws the line; `close` ends it, so what is printed next starts a line of its own."""

  def __init__(self, total: int, stream: TextIO | None = None):
    self.total = total
    self.stream = stream or sys.stdout
    self.drawn = self.stream.isatty()
    self.shown = False

  def show(self, saved: int, elapsed: float) -> None:
    if self.drawn:
      self.stream.write('\r' + line(min(saved, self.total), self.total, elapsed))
      self.stream.flush()
      self.shown = True

  def close(self) -> None:
    if self.shown:
      self.stream.write('\n')
      self.stream.flush()
      self.shown = False
