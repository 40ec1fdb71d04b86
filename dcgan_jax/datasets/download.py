"""tfds's download_and_prepare, failing within seconds on a machine without network and leaving
nothing behind when it fails (input_pipeline.get_builder calls it)."""

import os
from typing import Optional


DOWNLOAD_HOST = "storage.googleapis.com"  # where tfds looks first (prepared data, then most datasets)


def download_and_prepare(builder) -> None:
  """builder.download_and_prepare(), failing within seconds on a machine without network.

  tfds retries every file 10 times with exponential backoff (about 3.5 minutes before it gives up
  offline). The first attempt allows one retry; if it fails and DOWNLOAD_HOST does not resolve (no
  network), that failure stands, else (a flaky network) tfds tries again with its own retries."""
  from tensorflow_datasets.core.download import downloader  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(str(builder.data_dir)))
  prepared = os.path.exists(os.path.join(builder.data_dir, "dataset_info.json"))
  before = None if prepared else _paths_under(root)  # (a prepared dataset downloads nothing)
  saved = downloader.MAX_RETRIES
  downloader.MAX_RETRIES = 1
  try:
    builder.download_and_prepare()
    return
  except Exception:  # pylint: disable=broad-except
    if not _resolves(DOWNLOAD_HOST):
      if not prepared:
        _remove_new(root, before)  # the failed attempt's partial downloads: a refusal changes nothing
      raise
  finally:
    downloader.MAX_RETRIES = saved
  builder.download_and_prepare()


def _paths_under(root: str) -> Optional[set]:
  """Every path under root (None when root does not exist)."""
  if not os.path.isdir(root):
    return None
  found = set()
  for folder, dirs, files in os.walk(root):
    found.update(os.path.join(folder, n) for n in dirs + files)
  return found


def _remove_new(root: str, before: Optional[set]) -> None:
  """Removes what appeared under root since `before` (_paths_under), or root itself if it was new."""
  import shutil  # pylint: disable=g-import-not-at-top
  if before is None:
    shutil.rmtree(root, ignore_errors=True)
    return
  for path in sorted((_paths_under(root) or set()) - before, key=len):
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
      os.remove(path)


def _resolves(host: str, timeout: float = 3.0) -> bool:
  """Whether `host` resolves within `timeout` seconds (in a thread: getaddrinfo has no timeout)."""
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  import socket  # pylint: disable=g-import-not-at-top
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
  try:
    pool.submit(socket.getaddrinfo, host, 443).result(timeout=timeout)
    return True
  except Exception:  # pylint: disable=broad-except
    return False
  finally:
    pool.shutdown(wait=False)
