"""DVC 3 versioning of the active dataset: `data/` (git-ignored), tracked by `data.dvc`.

The data version of a run is the md5 of `data/` recorded in `data.dvc`, returned WITHOUT DVC's
`.dir` suffix (e.g. '3f2a...e1'), so it reads like any content hash in MLflow tags.

Heavy operations (init, add, push, pull, status) run through the documented `dvc` CLI of this
interpreter (`python -m dvc`), each in its own process with its own environment; remote settings
are written through DVC's own config editor (the code behind `dvc remote add/modify`), which
validates them and keeps secrets out of command lines. Credentials go to `.dvc/config.local`
(git-ignored by DVC) or come from the environment; never to the committed `.dvc/config`.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import yaml
from dvc.config import Config
from filelock import FileLock, Timeout
from pydantic import SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from data_layer.manifest import MANIFEST_NAME

ENV_PREFIX = "DPA_DVC_"
DATA_DIR = "data"
POINTER = "data.dvc"
BACKUP_DIR = ".data.previous"
"""Where the previous `data/` waits while a commit is in flight (same filesystem: a rename)."""
LOCK_FILE = ".dpa/locks/data.lock"
LOCK_TIMEOUT_ENV = "DPA_DATA_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 900.0
"""Seconds a commit or pull waits for another one on the same project (a big `dvc push` takes minutes)."""

log = logging.getLogger(__name__)

DVC_ENV_DEFAULTS = {
    "DVC_NO_ANALYTICS": "1",
    # botocore >= 1.36 adds CRC checksums that several S3-compatible servers reject; DVC checks
    # content by md5 itself, so only sending checksums when an operation requires them is safe.
    "AWS_REQUEST_CHECKSUM_CALCULATION": "WHEN_REQUIRED",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "WHEN_REQUIRED",
}
"""Set for DVC subprocesses unless the environment already says otherwise."""


class VersioningError(RuntimeError):
    """A DVC step failed; the message says which, why (DVC's own words) and what to do."""


class RemoteSettings(BaseSettings):
    """Where datasets are pushed. Environment: DPA_DVC_KIND, DPA_DVC_BUCKET, DPA_DVC_PREFIX,
    DPA_DVC_ENDPOINT_URL, DPA_DVC_REGION, DPA_DVC_PATH, DPA_DVC_ACCESS_KEY_ID, ...

    `local` is the default so a fresh clone works offline. Keys given here are stored in
    `.dvc/config.local` only; leave them unset to use the AWS environment/credential chain.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    name: str = "storage"
    kind: Literal["local", "s3"] = "local"
    path: Path = Path(".dpa/dvc-remote")
    """local: the remote directory; relative paths are relative to the repo root."""
    bucket: str | None = None
    prefix: str = "dpa"
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None

    @model_validator(mode="after")
    def _s3_needs_bucket(self) -> RemoteSettings:
        if self.kind == "s3" and not self.bucket:
            raise ValueError("an s3 remote needs a bucket (DPA_DVC_BUCKET)")
        return self

    def section(self, root: Path) -> dict[str, str]:
        """The committed, secret-free `remote "<name>"` section of `.dvc/config`."""
        if self.kind == "local":
            # Relative to the process cwd, as `dvc remote add` takes it; DVC stores it relative
            # to .dvc/, so the committed config works in every clone.
            return {"url": os.path.relpath(root / self.path)}
        options = {"url": f"s3://{self.bucket}/{self.prefix.strip('/')}".rstrip("/")}
        if self.endpoint_url:
            options["endpointurl"] = self.endpoint_url
        if self.region:
            options["region"] = self.region
        return options

    def secrets(self) -> dict[str, str]:
        """The machine-local `remote "<name>"` section of `.dvc/config.local`."""
        keys = {"access_key_id": self.access_key_id, "secret_access_key": self.secret_access_key}
        return {key: value.get_secret_value() for key, value in keys.items() if value}


def init_repo(root: str | Path, remote: RemoteSettings | None = None) -> None:
    """`dvc init` once and make sure `commit_dataset` has somewhere to push. Outside a git
    repository (a bare project directory on a worker) DVC runs without SCM (`--no-scm`).

    The remote is, in order: `remote` (the project's choice, committed); `RemoteSettings()` from
    DPA_DVC_* variables when any is set (this machine only, in `.dvc/config.local`, so the
    production profile never edits a tracked file); the configured one; the local default.
    """
    root = Path(root)
    if not (root / ".dvc").is_dir():
        in_git = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=root, capture_output=True).returncode == 0
        _dvc(root, "init", "--quiet", *([] if in_git else ["--no-scm"]))
    if remote is not None:
        configure_remote(root, remote)
    elif any(name.startswith(ENV_PREFIX) for name in os.environ):
        configure_remote(root, RemoteSettings(), machine_only=True)
    elif not Config(dvc_dir=str(root / ".dvc"))["core"].get("remote"):
        configure_remote(root, RemoteSettings())


def configure_remote(
    root: str | Path, settings: RemoteSettings | None = None, *, machine_only: bool = False
) -> str:
    """Make `settings` the default remote (replacing a same-named one); return its name.

    The secret-free section goes to the committed `.dvc/config`, or with `machine_only` to
    `.dvc/config.local`; credentials always go to `.dvc/config.local`.
    """
    root = Path(root)
    settings = settings or RemoteSettings()
    config = Config(dvc_dir=str(root / ".dvc"))
    if not machine_only:
        with config.edit("repo") as conf:
            conf["remote"][settings.name] = settings.section(root)
            conf["core"]["remote"] = settings.name
    with config.edit("local") as conf:
        local = {**(settings.section(root) if machine_only else {}), **settings.secrets()}
        conf["remote"].pop(settings.name, None)
        if local:
            conf["remote"][settings.name] = local
        if machine_only:
            conf["core"]["remote"] = settings.name
        else:
            conf["core"].pop("remote", None)
    return settings.name


def data_version(root: str | Path) -> str:
    """The md5 of `data/` recorded in `data.dvc` (`outs[0].md5`), without the '.dir' suffix."""
    pointer = Path(root) / POINTER
    try:
        md5 = yaml.safe_load(pointer.read_text(encoding="utf-8"))["outs"][0]["md5"]
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError) as exc:
        raise VersioningError(
            f"{pointer}: no dataset is tracked ({exc}). Import one (dpa data import ...) or "
            "restore data.dvc from git."
        ) from exc
    return md5.removesuffix(".dir")


def commit_dataset(root: str | Path, staged_dir: str | Path) -> str:
    """Make the validated `staged_dir` the active dataset: move it to `data/`, `dvc add`,
    `dvc push`; return the new data version.

    `staged_dir` is moved (a rename on the same filesystem). On any failure the previous `data/`
    and `data.dvc` are put back, `staged_dir` is restored, and the error is re-raised.
    """
    root, staged = Path(root), Path(staged_dir)
    if not (staged / MANIFEST_NAME).is_file():
        raise VersioningError(f"{staged}: no {MANIFEST_NAME}; stage a complete dataset first")
    with data_lock(root):
        return _commit(root, staged)


def _commit(root: Path, staged: Path) -> str:
    data, backup, pointer = root / DATA_DIR, root / BACKUP_DIR, root / POINTER
    previous_pointer = pointer.read_bytes() if pointer.exists() else None
    shutil.rmtree(backup, ignore_errors=True)
    if data.exists():
        data.rename(backup)
    try:
        shutil.move(staged, data)
        _dvc(root, "add", DATA_DIR)
        _dvc(root, "push", POINTER)
    except VersioningError as exc:
        _roll_back(root, staged, previous_pointer)
        raise VersioningError(
            f"{exc}\nNothing changed: the previous data/ and data.dvc are back and {staged} is "
            f"unchanged. Check {_describe_remote(root)} and its credentials, then retry."
        ) from exc
    except BaseException:
        _roll_back(root, staged, previous_pointer)
        raise
    shutil.rmtree(backup, ignore_errors=True)
    return data_version(root)


def resolve_dataset(root: str | Path) -> str:
    """Make `data/` match `data.dvc` (`dvc pull` when missing or stale) and return its version.

    Local edits to `data/` that were never committed are overwritten: `data.dvc` is the truth.
    """
    root = Path(root)
    with data_lock(root):
        return _resolve(root)


def _resolve(root: Path) -> str:
    version = data_version(root)
    if not _in_sync(root):
        try:
            _dvc(root, "pull", "--force", POINTER)
        except VersioningError as exc:
            raise VersioningError(
                f"cannot get data version {version} from {_describe_remote(root)}. If the "
                "remote lacks it, run `dvc push` in the clone that committed it, or re-create "
                f"the dataset with the importer (dpa data import ...).\n{exc}"
            ) from exc
    return version


@contextmanager
def data_lock(root: str | Path) -> Iterator[None]:
    """Hold the project's data lock: one process at a time changes or pulls `data/` and `data.dvc`,
    so two imports give two whole versions one after the other, never a mix. Another process
    waits up to $DPA_DATA_LOCK_TIMEOUT seconds. It is an OS lock: a killed holder releases it."""
    file = Path(root) / LOCK_FILE
    file.parent.mkdir(parents=True, exist_ok=True)
    timeout = float(os.environ.get(LOCK_TIMEOUT_ENV, DEFAULT_LOCK_TIMEOUT))
    lock = FileLock(file)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("another process is committing or pulling data in %s; waiting up to %g s for %s", root, timeout, file)
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise VersioningError(
                f"{root}: another process kept the data lock ({file}) for more than {timeout:g} s while committing "
                f"or pulling a dataset. Nothing was changed. Wait for it to finish and retry, or set "
                f"{LOCK_TIMEOUT_ENV} to wait longer."
            ) from None
    try:
        yield
    finally:
        lock.release()


def _in_sync(root: Path) -> bool:
    """`data/` exists and `dvc status` (local only: workspace vs data.dvc) reports no change."""
    if not (root / DATA_DIR).is_dir():
        return False
    return _dvc(root, "status", "--json", POINTER).strip() in ("", "{}")


def _roll_back(root: Path, staged: Path, previous_pointer: bytes | None) -> None:
    data, backup, pointer = root / DATA_DIR, root / BACKUP_DIR, root / POINTER
    if data.exists() and not staged.exists():
        shutil.move(data, staged)
    shutil.rmtree(data, ignore_errors=True)
    if backup.exists():
        backup.rename(data)
    if previous_pointer is None:
        pointer.unlink(missing_ok=True)
    else:
        pointer.write_bytes(previous_pointer)


def _describe_remote(root: Path) -> str:
    config = Config(dvc_dir=str(root / ".dvc"))
    name = config["core"].get("remote")
    if not name:
        return "the DVC remote (none is configured: see RemoteSettings)"
    return f"DVC remote '{name}' ({config['remote'].get(name, {}).get('url', 'no url')})"


def _dvc(root: str | Path, *args: str) -> str:
    """Run `python -m dvc *args` in `root`; return stdout, or raise with DVC's error text."""
    env = {**DVC_ENV_DEFAULTS, **os.environ}
    completed = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=root, env=env, capture_output=True, text=True, check=False,
    )
    if completed.returncode != 0:
        output = (completed.stderr or completed.stdout).strip()[-2000:]
        output = output.split("\nHaving any troubles?")[0].strip()
        raise VersioningError(f"`dvc {' '.join(args)}` failed in {root}:\n{output}")
    return completed.stdout
