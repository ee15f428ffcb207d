"""A `gs://` (or other remote) workdir checked before anything trains or loads.

Config, metrics and checkpoint directories go through etils.epath (gcsfs for
`gs://`), TensorBoard events through google-cloud-storage and checkpoint
arrays through tensorstore's own GCS driver; all three use Google's
application-default credentials. A bucket that does not exist or credentials
that Cloud Storage refuses would otherwise surface as a traceback from
whichever client touches the bucket first, possibly after compiling;
`check_workdir` turns both into one line naming the workdir and what to check.
"""

from __future__ import annotations

import uuid

from etils import epath


class StorageError(ValueError):
  """A remote workdir that cannot be used: no such bucket, or refused."""


def is_remote(workdir: str) -> bool:
  return '://' in str(workdir)


def _bucket(workdir: str) -> str:
  scheme, _, rest = str(workdir).partition('://')
  return f'{scheme}://{rest.split("/", 1)[0]}'


def _one_line(error: Exception) -> str:
  """The error and Cloud Storage's reason (gcsfs puts it on a second line)."""
  return f'{type(error).__name__}: {" ".join(str(error).split())[:400]}'


def _missing(workdir: str) -> StorageError:
  bucket = _bucket(workdir)
  return StorageError(
      f'--workdir={workdir}: the bucket {bucket} does not exist; check its '
      f'name, or create it (gcloud storage buckets create {bucket} '
      '--location=REGION, in the region of the TPU VMs).')


def _refused(workdir: str, error: Exception, access: str) -> StorageError:
  return StorageError(
      f'--workdir={workdir}: Cloud Storage refused to {access} it '
      f'({_one_line(error)}); check the credentials (on a TPU VM: its '
      'service account needs roles/storage.objectAdmin on the bucket; '
      'elsewhere: gcloud auth application-default login or '
      'GOOGLE_APPLICATION_CREDENTIALS).')


def check_workdir(workdir: str, write: bool) -> None:
  """Raises StorageError unless remote `workdir` can be read (and, if `write`,
  written: an empty object is created in it and deleted). Local paths pass."""
  if not is_remote(workdir):
    return
  path = epath.Path(workdir)
  try:
    if write:
      probe = path / f'.nin_jax_write_check_{uuid.uuid4().hex}'
      probe.write_text('')
      probe.unlink()
      return
    if path.exists():
      return
    bucket_exists = epath.Path(_bucket(workdir)).exists()
  except FileNotFoundError:
    raise _missing(workdir) from None
  except Exception as e:  # pylint: disable=broad-except
    raise _refused(workdir, e, 'write to' if write else 'read') from None
  if not bucket_exists:
    raise _missing(workdir)
