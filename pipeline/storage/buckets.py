"""Where gs:// paths go: Google Cloud Storage, or a GCS-protocol emulator.

Against real GCS nothing needs setting: gcsfs (under etils.epath) and
TensorStore (under Orbax) find Application Default Credentials as Google's
libraries do (`gcloud auth application-default login`, a service account on
Dataflow, GOOGLE_APPLICATION_CREDENTIALS). We never read or log a token.

Against an emulator (tests, or a user's own), `use_gcs_emulator(endpoint)`
points both at it. It sets environment variables, so processes started
afterwards (the local runner's workers) inherit it; DoFns call it again in
`setup()` so workers of any runner get it from the pipeline itself.
"""
from __future__ import annotations

import os
import re

import fsspec
from etils import epath

from pipeline.storage import files

ENDPOINT_ENV = 'CKPT_SURGERY_GCS_ENDPOINT'


def emulator_environment(endpoint: str) -> dict[str, str]:
  """The variables that point gcsfs and TensorStore at `endpoint`."""
  endpoint = endpoint.rstrip('/')
  return {
      'STORAGE_EMULATOR_HOST': endpoint,        # gcsfs
      'FSSPEC_GCS_TOKEN': 'anon',               # gcsfs: no credential search
      # Otherwise gcsfs waits 60 s per bucket on a gRPC call emulators do not answer.
      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
      'TENSORSTORE_GCS_HTTP_URL': endpoint,     # TensorStore's GCS driver
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',  # TensorStore: no credential search
  }


def use_gcs_emulator(endpoint: str) -> None:
  """Send every gs:// read and write of this process (and of the processes it
  starts) to the GCS-protocol server at `endpoint`, e.g. http://127.0.0.1:9023.

  Call it before the process first touches gs:// arrays: TensorStore reads
  its endpoint once per process.
  """
  os.environ.update(emulator_environment(endpoint))
  fsspec.config.conf.setdefault('gcs', {})['token'] = 'anon'  # read at import time
  import gcsfs  # pylint: disable=g-import-not-at-top
  gcsfs.GCSFileSystem.clear_instance_cache()


def configure(endpoint: str | None) -> None:
  """Use the emulator at `endpoint`, or the one in $CKPT_SURGERY_GCS_ENDPOINT, if any."""
  endpoint = endpoint or os.environ.get(ENDPOINT_ENV)
  if endpoint:
    use_gcs_emulator(endpoint)


class StorageError(OSError):
  """A bucket that is missing or cannot be reached."""


def check_bucket(url: str, role: str) -> None:
  """Refuse a gs:// URL whose bucket does not exist or cannot be seen."""
  if not files.is_gcs(url):
    return
  bucket = 'gs://' + url[len('gs://'):].split('/')[0]
  try:
    exists = epath.Path(bucket).exists()
  except Exception as e:  # 403 and friends: say which bucket, and why
    raise StorageError(f'{role} bucket {bucket} cannot be reached: {type(e).__name__}: {e}') from None
  if not exists:
    raise StorageError(f'{role} bucket {bucket} does not exist (or these credentials cannot see it)')


# HTTP statuses and gRPC/socket words that mean "try again".
_TRANSIENT = re.compile(
    r'\b(408|429|500|502|503|504)\b|UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED|'
    r'[Cc]onnection (reset|refused|aborted)|timed out|Broken pipe')


def is_transient(error: BaseException) -> bool:
  """Whether an error (or one it was raised from) is worth retrying."""
  while error is not None:
    if isinstance(error, (ConnectionError, TimeoutError)) or _TRANSIENT.search(str(error)):
      return True
    error = error.__cause__ or error.__context__
  return False
