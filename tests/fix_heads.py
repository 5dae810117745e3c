"""A user's `python:` op, as a spec names it: 'tests.fix_heads:double_bias'."""


def double_bias(state):
  params = dict(state['params'])
  params['Dense_0'] = {**params['Dense_0'], 'bias': params['Dense_0']['bias'] * 2}
  return {**state, 'params': params}
