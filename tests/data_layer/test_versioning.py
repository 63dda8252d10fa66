"""DVC versioning in throwaway git+dvc repos: local and S3 (moto) round trips, credentials kept
out of the committed config, and a failed commit that leaves the previous version intact."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from data_layer.versioning import (
    DatasetNotFound,
    RemoteSettings,
    VersioningError,
    commit_dataset,
    configure_remote,
    data_lock,
    data_version,
    init_repo,
    promote_dataset,
    resolve_dataset,
)
from tests.conftest import S3Bucket


def stage(directory: Path, seed: int) -> Path:
    """A tiny dataset; `seed` changes the bytes and therefore the version."""
    (directory / "images").mkdir(parents=True)
    (directory / "manifest.csv").write_text("path,label,split,group,anomaly_type\n")
    for i in range(3):
        (directory / "images" / f"{i}.bin").write_bytes(bytes([seed, i]) * 100)
    return directory


def snapshot(directory: Path) -> dict[str, bytes]:
    files = (f for f in directory.rglob("*") if f.is_file())
    return {str(f.relative_to(directory)): f.read_bytes() for f in files}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "--quiet"], cwd=root, check=True)
    init_repo(root, RemoteSettings(path=tmp_path / "remote"))
    return root


def test_init_is_idempotent_and_defaults_to_a_portable_local_remote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [name for name in os.environ if name.startswith("DPA_DVC_")]:
        monkeypatch.delenv(name)
    subprocess.run(["git", "init", "--quiet", str(tmp_path)], check=True)
    init_repo(tmp_path)
    config = (tmp_path / ".dvc" / "config").read_text()
    assert "remote = storage" in config and "url = ../.dpa/dvc-remote" in config
    init_repo(tmp_path)
    assert (tmp_path / ".dvc" / "config").read_text() == config


def test_a_project_directory_outside_git_works_without_scm(tmp_path: Path) -> None:
    root = tmp_path / "bare-project"
    root.mkdir()
    init_repo(root, RemoteSettings(path=tmp_path / "remote"))
    version = commit_dataset(root, stage(tmp_path / "v1", seed=3))
    wipe_local_copies(root)
    assert resolve_dataset(root) == version


def wipe_local_copies(root: Path) -> None:
    shutil.rmtree(root / "data")
    shutil.rmtree(root / ".dvc" / "cache")


def test_local_round_trip(repo: Path, tmp_path: Path) -> None:
    expected = snapshot(stage(tmp_path / "v1", seed=1))
    version = commit_dataset(repo, tmp_path / "v1")
    pointer = yaml.safe_load((repo / "data.dvc").read_text())
    assert version == data_version(repo) == pointer["outs"][0]["md5"].removesuffix(".dir")
    assert not (tmp_path / "v1").exists() and not (repo / ".data.previous").exists()
    assert list((tmp_path / "remote").rglob("*")), "nothing was pushed"
    wipe_local_copies(repo)
    assert resolve_dataset(repo) == version
    assert snapshot(repo / "data") == expected


def test_imports_are_versioned_in_workspaces_and_only_a_promotion_changes_production(repo: Path, tmp_path: Path) -> None:
    production = commit_dataset(repo, stage(tmp_path / "prod", seed=1))
    pointer = (repo / "data.dvc").read_bytes()
    experiment = commit_dataset(repo, stage(tmp_path / "exp", seed=2), "my-experiment")
    assert (repo / "datasets" / "my-experiment.dvc").is_file() and experiment != production
    assert (repo / "data.dvc").read_bytes() == pointer and data_version(repo) == production
    assert snapshot(repo / "datasets" / "my-experiment") == snapshot(stage(tmp_path / "again", seed=2))

    (repo / "datasets" / "my-experiment" / "images" / "0.bin").write_bytes(b"edited after the commit")
    assert promote_dataset(repo, "my-experiment") == experiment == data_version(repo)  # the recorded version, not the edit
    assert snapshot(repo / "data") == snapshot(repo / "datasets" / "my-experiment")
    wipe_local_copies(repo)
    assert resolve_dataset(repo) == experiment


def test_bad_or_missing_dataset_names_are_refused_with_the_fix(repo: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFound, match=r"data.dvc: no production dataset is tracked .*dpa data promote"):
        data_version(repo)
    with pytest.raises(DatasetNotFound, match="no nope dataset is tracked"):
        promote_dataset(repo, "nope")
    for bad in ("../escape", "", "a/b", "production"):
        with pytest.raises(DatasetNotFound):
            promote_dataset(repo, bad)
    assert not (repo / "data").exists()


def test_stale_workspace_is_restored_and_new_commit_changes_version(
    repo: Path, tmp_path: Path
) -> None:
    first = commit_dataset(repo, stage(tmp_path / "v1", seed=1))
    (repo / "data" / "images" / "0.bin").write_bytes(b"edited by hand")
    assert resolve_dataset(repo) == first
    assert (repo / "data" / "images" / "0.bin").read_bytes() == bytes([1, 0]) * 100
    second = commit_dataset(repo, stage(tmp_path / "v2", seed=2))
    assert second != first and resolve_dataset(repo) == second


def test_failed_commit_keeps_previous_version(repo: Path, tmp_path: Path) -> None:
    version = commit_dataset(repo, stage(tmp_path / "v1", seed=1))
    before = snapshot(repo / "data"), (repo / "data.dvc").read_bytes()
    (tmp_path / "blocker").write_text("a file where the remote directory should go")
    configure_remote(repo, RemoteSettings(path=tmp_path / "blocker" / "remote"))
    staged = snapshot(stage(tmp_path / "v2", seed=2))
    with pytest.raises(VersioningError, match="(?s)dvc push.*Nothing changed"):
        commit_dataset(repo, tmp_path / "v2")
    assert data_version(repo) == version
    assert (snapshot(repo / "data"), (repo / "data.dvc").read_bytes()) == before
    assert snapshot(tmp_path / "v2") == staged
    assert not (repo / ".data.previous").exists()


def test_pull_from_remote_without_the_data_names_remote_and_fix(
    repo: Path, tmp_path: Path
) -> None:
    version = commit_dataset(repo, stage(tmp_path / "v1", seed=1))
    configure_remote(repo, RemoteSettings(name="empty", path=tmp_path / "empty"))
    wipe_local_copies(repo)
    with pytest.raises(VersioningError) as caught:
        resolve_dataset(repo)
    message = str(caught.value)
    assert version in message and "remote 'empty'" in message and "dvc push" in message


def test_missing_pointer_is_a_clear_error(repo: Path) -> None:
    with pytest.raises(VersioningError, match="no production dataset is tracked"):
        data_version(repo)


def test_remote_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DPA_DVC_KIND", "s3")
    monkeypatch.setenv("DPA_DVC_BUCKET", "datasets")
    monkeypatch.setenv("DPA_DVC_ENDPOINT_URL", "http://127.0.0.1:9000")
    settings = RemoteSettings()
    assert settings.section(Path(".")) == {
        "url": "s3://datasets/dpa", "endpointurl": "http://127.0.0.1:9000"
    }
    monkeypatch.delenv("DPA_DVC_BUCKET")
    with pytest.raises(ValueError, match="bucket"):
        RemoteSettings()


@pytest.mark.integration
def test_s3_round_trip_configured_by_environment(
    repo: Path, tmp_path: Path, s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    committed = (repo / ".dvc" / "config").read_text()
    for key, value in {"KIND": "s3", "BUCKET": s3_bucket.name, "PREFIX": "datasets/dpa",
                       "ENDPOINT_URL": s3_bucket.endpoint_url}.items():
        monkeypatch.setenv(f"DPA_DVC_{key}", value)
    init_repo(repo)
    assert (repo / ".dvc" / "config").read_text() == committed, "a tracked file was edited"
    expected = snapshot(stage(tmp_path / "v1", seed=7))
    version = commit_dataset(repo, tmp_path / "v1")
    listed = s3_bucket.client().list_objects_v2(Bucket=s3_bucket.name, Prefix="datasets/dpa/")
    cache = repo / ".dvc" / "cache"
    cached = {str(f.relative_to(cache)) for f in cache.rglob("*") if f.is_file()}
    assert {item["Key"].removeprefix("datasets/dpa/") for item in listed["Contents"]} == cached
    assert len(cached) == 5  # 4 files + the directory listing
    wipe_local_copies(repo)
    assert resolve_dataset(repo) == version
    assert snapshot(repo / "data") == expected


@pytest.mark.integration
def test_s3_credentials_stay_out_of_committed_config(
    repo: Path, tmp_path: Path, s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_id, secret = "AKIAEXAMPLEKEY123456", "s3cr3t/EXAMPLE+key"
    settings = RemoteSettings(
        kind="s3", bucket=s3_bucket.name, endpoint_url=s3_bucket.endpoint_url,
        region=s3_bucket.region, access_key_id=key_id, secret_access_key=secret,
    )
    configure_remote(repo, settings)
    committed = (repo / ".dvc" / "config").read_text()
    assert key_id not in committed and secret not in committed and s3_bucket.name in committed
    local = (repo / ".dvc" / "config.local").read_text()
    assert key_id in local and secret in local
    ignored = subprocess.run(["git", "check-ignore", ".dvc/config.local"], cwd=repo)
    assert ignored.returncode == 0, ".dvc/config.local would be committed"
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    version = commit_dataset(repo, stage(tmp_path / "v1", seed=8))
    wipe_local_copies(repo)
    assert resolve_dataset(repo) == version
    assert key_id not in (repo / ".dvc" / "config").read_text()


def test_same_phantom_seed_gives_the_same_data_version(tmp_path: Path) -> None:
    from data_layer.phantoms import PhantomSpec, generate_phantoms

    spec = PhantomSpec(n_train_normal=12, n_val_normal=2, n_test_normal=4, n_val_abnormal=2, n_test_abnormal=4, size=32, seed=7)
    versions = []
    for name in ("a", "b"):
        root = tmp_path / name
        root.mkdir()
        init_repo(root, RemoteSettings(path=tmp_path / f"remote-{name}"))
        versions.append(commit_dataset(root, generate_phantoms(tmp_path / f"staged-{name}", spec)))
    other = tmp_path / "c"
    other.mkdir()
    init_repo(other, RemoteSettings(path=tmp_path / "remote-c"))
    different = commit_dataset(other, generate_phantoms(tmp_path / "staged-c", spec.model_copy(update={"seed": 8})))
    assert versions[0] == versions[1] != different


COMMIT_SCRIPT = "import sys; from data_layer.versioning import commit_dataset; print(commit_dataset(sys.argv[1], sys.argv[2]))"


def start_commit(root: Path, staged: Path, **env: str) -> subprocess.Popen:
    """`commit_dataset` in its own process, as a second `dpa data import --workspace` runs it."""
    repo_root = Path(__file__).resolve().parents[2]
    return subprocess.Popen([sys.executable, "-c", COMMIT_SCRIPT, str(root), str(staged)],
                            env={**os.environ, "PYTHONPATH": str(repo_root), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_concurrent_commits_give_two_whole_versions_one_after_the_other(repo: Path, tmp_path: Path) -> None:
    staged = {seed: stage(tmp_path / f"staged{seed}", seed) for seed in (1, 2)}
    contents = {seed: snapshot(path) for seed, path in staged.items()}
    processes = {seed: start_commit(repo, path) for seed, path in staged.items()}
    versions = {}
    for seed, process in processes.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
        versions[seed] = out.strip().splitlines()[-1]
    assert versions[1] != versions[2]
    active = data_version(repo)
    winner = next(seed for seed, version in versions.items() if version == active)
    assert snapshot(repo / "data") == contents[winner]  # data/ is all of one import, none of the other
    assert resolve_dataset(repo) == active  # data/ matches data.dvc (dvc status is clean)
    pushed = {p.parent.name + p.name.removesuffix(".dir") for p in (tmp_path / "remote").rglob("*.dir")}
    assert set(versions.values()) <= pushed  # both versions are whole in the remote
    assert not (repo / ".data.previous").exists()


def test_a_commit_waits_for_the_data_lock_and_gives_up_with_a_clear_message(repo: Path, tmp_path: Path) -> None:
    commit_dataset(repo, stage(tmp_path / "first", 1))
    before = (repo / "data.dvc").read_bytes(), snapshot(repo / "data")
    with data_lock(repo):
        process = start_commit(repo, stage(tmp_path / "second", 2), DPA_DATA_LOCK_TIMEOUT="2")
        _, err = process.communicate(timeout=120)
        assert process.returncode != 0
        assert "kept the data lock" in err and "Nothing was changed" in err and "DPA_DATA_LOCK_TIMEOUT" in err
        assert ((repo / "data.dvc").read_bytes(), snapshot(repo / "data")) == before
        waiting = start_commit(repo, tmp_path / "second", DPA_DATA_LOCK_TIMEOUT="120")
        time.sleep(3)
        assert waiting.poll() is None and (repo / "data.dvc").read_bytes() == before[0]  # it waits
    out, err = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, err[-3000:]
    assert out.strip().splitlines()[-1] == data_version(repo) != yaml.safe_load(before[0])["outs"][0]["md5"].removesuffix(".dir")
