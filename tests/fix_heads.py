"""A user's `python:` op, as a spec names it: 'tests.fix_heads:double_bias'."""
import threading

RELEASE = threading.Event()  # lets never_returns return


def double_bias(state):
  params = dict(state['params'])
  params['Dense_0'] = {**params['Dense_0'], 'bias': params['Dense_0']['bias'] * 2}
  return {**state, 'params': params}


def never_returns(state):
  """A python: op that hangs (a bug, a deadlock) until a test lets it go."""
  RELEASE.wait()
  return state


_calls = []


def hangs_once(state):
  """A python: op that hangs the first time only (until a test lets it go)."""
  _calls.append(None)
  if len(_calls) == 1:
    RELEASE.wait()
  return state


def unit_global_norm(state):
  """A python: op that reads every param: each is divided by their global norm."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  norm = optax.global_norm(state['params'])
  return {**state, 'params': jax.tree.map(lambda x: x / norm, state['params'])}


def params_only(state):
  """A python: op that loses the optimizer state: it returns the params alone."""
  return {'params': state['params']}


def add_param_without_moments(state):
  """A python: op that adds a param and nothing for it in the optimizer state."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return {**state, 'params': {**state['params'], 'Extra': {'bias': jnp.zeros((3,))}}}


def drop_param_keeping_moments(state):
  """A python: op that removes a param and leaves its moments behind."""
  params = dict(state['params'])
  del params['Dense_1']
  return {**state, 'params': params}


def exits_the_process(state):
  """A python: op that ends the process it runs in, with status 0."""
  import os  # pylint: disable=g-import-not-at-top
  os._exit(0)  # pylint: disable=protected-access


def exits_quietly(state):
  """A python: op that raises SystemExit(0) where it runs."""
  import sys  # pylint: disable=g-import-not-at-top
  sys.exit(0)
