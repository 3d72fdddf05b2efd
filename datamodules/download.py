"""Where benchmark files live, and fetching them safely.

Files are looked for in ``data_dir`` (an argument), else ``$TITANS_TS_DATA``, else
``$XDG_CACHE_HOME/titans-ts`` (``~/.cache/titans-ts`` when XDG_CACHE_HOME is unset).

Downloads stream into a temporary file in the destination folder, are checked
against a sha256 and only then renamed into place with :func:`os.replace`, so an
interrupted or corrupt download never leaves a half-written file behind.

The URL for a dataset is, in order: the ``url`` argument of the DataModule;
``$TITANS_TS_DATA_URL`` + "/" + file name (a base URL, e.g. a local mirror);
:data:`URLS`. Both :data:`URLS` and :data:`SHA256` are plain dicts that can be
edited at runtime.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

__all__ = [
    "DATA_DIR_ENV",
    "DATA_URL_ENV",
    "DEFAULT_TIMEOUT",
    "SHA256",
    "URLS",
    "ChecksumError",
    "DownloadError",
    "default_data_dir",
    "download_file",
    "resolve_data_dir",
    "resolve_url",
    "sha256sum",
]

log = logging.getLogger(__name__)

DATA_DIR_ENV = "TITANS_TS_DATA"
DATA_URL_ENV = "TITANS_TS_DATA_URL"
#: Seconds to wait for the server to connect or send data (not a limit on the whole transfer).
DEFAULT_TIMEOUT = 30.0

_ETT_BASE = "https://raw.githubusercontent.com/zhouhaoyi/ETDataset/main/ETT-small/"

#: Canonical download URL per dataset. ECL, Traffic and Weather are distributed
#: only as the Autoformer / Time-Series-Library Google Drive bundle, which has no
#: direct file URL, so there is none here: pass ``url=`` or set $TITANS_TS_DATA_URL,
#: or put the file in the data folder yourself.
URLS: dict[str, str | None] = {
    "ETTh1": _ETT_BASE + "ETTh1.csv",
    "ETTh2": _ETT_BASE + "ETTh2.csv",
    "ETTm1": _ETT_BASE + "ETTm1.csv",
    "ETTm2": _ETT_BASE + "ETTm2.csv",
    "ECL": None,
    "Traffic": None,
    "Weather": None,
}

#: Known sha256 of the canonical files. ``None`` means "not verified yet": the
#: download is accepted with a logged warning that prints its hash.
SHA256: dict[str, str | None] = {
    "ETTh1": "f18de3ad269cef59bb07b5438d79bb3042d3be49bdeecf01c1cd6d29695ee066",
    "ETTh2": "a3dc2c597b9218c7ce1cd55eb77b283fd459a1d09d753063f944967dd6b9218b",
    "ETTm1": None,
    "ETTm2": None,
    "ECL": None,
    "Traffic": None,
    "Weather": None,
}

_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A dataset file could not be fetched (offline, HTTP error, no known URL, truncated transfer)."""


class ChecksumError(DownloadError):
    """A file's sha256 differs from the expected one."""


def default_data_dir() -> Path:
    """``$TITANS_TS_DATA``, else ``$XDG_CACHE_HOME/titans-ts``, else ``~/.cache/titans-ts``."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "titans-ts"


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """``data_dir`` if given, else :func:`default_data_dir`."""
    return Path(data_dir).expanduser() if data_dir is not None else default_data_dir()


def resolve_url(name: str, file_name: str, url: str | None = None) -> str | None:
    """Download URL for dataset ``name``: explicit ``url``, else $TITANS_TS_DATA_URL/<file_name>, else :data:`URLS`."""
    if url:
        return url
    base = os.environ.get(DATA_URL_ENV)
    if base:
        return f"{base.rstrip('/')}/{file_name}"
    return URLS.get(name)


def sha256sum(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return f"{type(exc).__name__}: {exc}"


def download_file(
    url: str,
    dest: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    progress: bool = True,
) -> Path:
    """Fetch ``url`` to ``dest`` atomically, verifying ``sha256`` when given.

    Raises:
        DownloadError: the transfer failed; nothing is left at ``dest``.
        ChecksumError: the content's sha256 differs from ``sha256``; nothing is left at ``dest``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Same folder as dest so os.replace is an atomic rename, never a cross-device copy.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    received = 0
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (URL is configuration)
                    length = response.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                              desc=f"Downloading {dest.name}", disable=not progress, leave=False) as bar:
                        while chunk := response.read(_CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            received += len(chunk)
                            bar.update(len(chunk))
            except (OSError, http.client.HTTPException, ValueError) as exc:
                # URLError, HTTPError and socket timeouts are OSErrors; ValueError is a malformed URL.
                raise DownloadError(
                    f"could not download {url} ({_reason(exc)}). Without network access, fetch the file "
                    f"another way and put it at {dest}"
                ) from exc
            if total is not None and received != total:
                raise DownloadError(
                    f"download of {url} was cut short ({received} of {total} bytes); retry, or put the file at {dest}"
                )
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if sha256 is not None and actual != sha256.strip().lower():
            raise ChecksumError(
                f"sha256 mismatch for {url}: expected {sha256}, got {actual}; the file was not saved. "
                f"Check the URL (or the sha256), or put a verified copy of the file at {dest}"
            )
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the data file is not secret
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sha256 is None:
        log.warning(
            "No sha256 is known for %s, so the download was not verified; its sha256 is %s "
            "(pass sha256=... to enforce it next time).", url, actual,
        )
    return dest
