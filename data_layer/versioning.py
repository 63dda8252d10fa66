"""DVC 3 versioning of the project's datasets: the production dataset and the import workspaces.

- **production**: `data/`, tracked by `data.dvc`: what scheduled retraining reads. It changes only
  by an explicit promotion (`promote_dataset`, `dpa data promote`, or a training run's `promote`).
- **workspaces**: `datasets/<name>/`, tracked by `datasets/<name>.dvc`: where imports are versioned
  (one per preset by default, or per experiment), so an experiment never touches production data.

A dataset's version is the md5 of its directory recorded in its pointer, returned WITHOUT DVC's
`.dir` suffix (e.g. '3f2a...e1'), so it reads like any content hash in MLflow tags. Promoting copies
a workspace's version to production: same content, same version (DVC stores it once).

Heavy operations (init, add, push, pull, status) run through the documented `dvc` CLI of this
interpreter (`python -m dvc`), each in its own process with its own environment; remote settings
are written through DVC's own config editor (the code behind `dvc remote add/modify`), which
validates them and keeps secrets out of command lines. Credentials go to `.dvc/config.local`
(git-ignored by DVC) or come from the environment; never to the committed `.dvc/config`.
"""

from __future__ import annotations

import logging
import os
import re
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
PRODUCTION = "production"
DATA_DIR = "data"
POINTER = "data.dvc"
WORKSPACES_DIR = "datasets"
_WORKSPACE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
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


class DatasetNotFound(VersioningError):
    """The named dataset (production or a workspace) is not tracked, or its name is not allowed."""


def dataset_paths(name: str = PRODUCTION) -> tuple[str, str]:
    """(directory, DVC pointer) of a dataset, relative to the project: `data`, `data.dvc` for
    production; `datasets/<name>`, `datasets/<name>.dvc` for a workspace."""
    if name == PRODUCTION:
        return DATA_DIR, POINTER
    if not _WORKSPACE_NAME.fullmatch(name):
        raise DatasetNotFound(
            f"dataset workspace name {name!r}: use letters, digits, '.', '_' or '-' (up to 64, starting with a letter "
            "or digit), e.g. the preset's name"
        )
    return f"{WORKSPACES_DIR}/{name}", f"{WORKSPACES_DIR}/{name}.dvc"


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


def data_version(root: str | Path, name: str = PRODUCTION) -> str:
    """The md5 of dataset `name` recorded in its pointer (`outs[0].md5`), without the '.dir' suffix."""
    pointer = Path(root) / dataset_paths(name)[1]
    try:
        md5 = yaml.safe_load(pointer.read_text(encoding="utf-8"))["outs"][0]["md5"]
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError) as exc:
        hint = (
            "Promote a workspace to production (`dpa data promote <workspace>`; `dpa demo` promotes its own), "
            "or import one (`dpa data import KIND --workspace NAME --promote`)"
            if name == PRODUCTION else f"Import into it (a training run with an importer and dataset.workspace={name})"
        )
        raise DatasetNotFound(f"{pointer}: no {name} dataset is tracked ({exc}). {hint}, or restore {pointer.name} from git.") from exc
    return md5.removesuffix(".dir")


def commit_dataset(root: str | Path, staged_dir: str | Path, name: str = PRODUCTION) -> str:
    """Make the validated `staged_dir` the current version of dataset `name`: move it into place,
    `dvc add`, `dvc push`; return the new version.

    `staged_dir` is moved (a rename on the same filesystem). On any failure the previous directory
    and pointer are put back, `staged_dir` is restored, and the error is re-raised.
    """
    root, staged = Path(root), Path(staged_dir)
    if not (staged / MANIFEST_NAME).is_file():
        raise VersioningError(f"{staged}: no {MANIFEST_NAME}; stage a complete dataset first")
    with data_lock(root):
        return _commit(root, staged, name)


def promote_dataset(root: str | Path, workspace: str) -> str:
    """Make the current version of `workspace` the production dataset (`data/`), the one scheduled
    retraining reads; return that version. The workspace is first made to match its pointer (pulled
    if needed), so exactly the recorded version is promoted."""
    root = Path(root)
    if workspace == PRODUCTION:
        raise DatasetNotFound("'production' is the dataset promotions write to: name a workspace (datasets/<name>)")
    with data_lock(root):
        version = _resolve(root, workspace)
        staged = root / ".dpa" / "staging-promotion"
        shutil.rmtree(staged, ignore_errors=True)
        staged.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(root / dataset_paths(workspace)[0], staged, symlinks=True)
        promoted = _commit(root, staged, PRODUCTION)
    if promoted != version:
        raise VersioningError(f"promoting {workspace} gave version {promoted}, not its recorded {version}: check {root / DATA_DIR}")
    return promoted


def _commit(root: Path, staged: Path, name: str) -> str:
    directory, pointer_name = dataset_paths(name)
    data, pointer = root / directory, root / pointer_name
    backup = data.with_name(f".{data.name}.previous")
    previous_pointer = pointer.read_bytes() if pointer.exists() else None
    shutil.rmtree(backup, ignore_errors=True)
    data.parent.mkdir(parents=True, exist_ok=True)
    if data.exists():
        data.rename(backup)
    try:
        shutil.move(staged, data)
        _dvc(root, "add", directory)
        _dvc(root, "push", pointer_name)
    except VersioningError as exc:
        _roll_back(staged, data, backup, pointer, previous_pointer)
        raise VersioningError(
            f"{exc}\nNothing changed: the previous {directory}/ and {pointer_name} are back and {staged} is "
            f"unchanged. Check {_describe_remote(root)} and its credentials, then retry."
        ) from exc
    except BaseException:
        _roll_back(staged, data, backup, pointer, previous_pointer)
        raise
    shutil.rmtree(backup, ignore_errors=True)
    return data_version(root, name)


def resolve_dataset(root: str | Path, name: str = PRODUCTION) -> str:
    """Make dataset `name` match its pointer (`dvc pull` when missing or stale) and return its version.

    Local edits that were never committed are overwritten: the pointer is the truth.
    """
    root = Path(root)
    with data_lock(root):
        return _resolve(root, name)


def _resolve(root: Path, name: str) -> str:
    version = data_version(root, name)
    if not _in_sync(root, name):
        try:
            _dvc(root, "pull", "--force", dataset_paths(name)[1])
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


def _in_sync(root: Path, name: str) -> bool:
    """The directory exists and `dvc status` (local only: workspace vs pointer) reports no change."""
    directory, pointer = dataset_paths(name)
    if not (root / directory).is_dir():
        return False
    return _dvc(root, "status", "--json", pointer).strip() in ("", "{}")


def _roll_back(staged: Path, data: Path, backup: Path, pointer: Path, previous_pointer: bytes | None) -> None:
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
