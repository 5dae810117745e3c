"""The Dataflow flex template's program: its parameters are `ckpt-surgery run`'s.

Dataflow passes template parameters as --name=value, booleans as true/false;
Beam options (runner, project, sdk_container_image, ...) pass through. The
launcher submits the job and exits (--detach); the report lands under the
output prefix when the job ends.
"""
import argparse
import sys

from pipeline import cli


def to_cli(argv: list[str]) -> list[str]:
  """Template arguments -> `ckpt-surgery run` arguments."""
  switches = {name for name, action in cli.run_arguments().items()
              if isinstance(action, argparse._StoreTrueAction)}  # pylint: disable=protected-access
  out = ['run', '--detach']
  for arg in argv:
    name, _, value = arg.partition('=')
    if name.lstrip('-') in switches:
      if value.lower() in ('', 'true', '1', 'yes'):
        out.append(name)
      continue
    out.append(arg)
  return out


if __name__ == '__main__':
  sys.exit(cli.main(to_cli(sys.argv[1:])))
