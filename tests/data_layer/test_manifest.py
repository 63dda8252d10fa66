"""The manifest contract: structural reading, deterministic writing, safe paths, selection."""

from __future__ import annotations

import pandas as pd
import pytest

from data_layer.manifest import (
    COLUMNS,
    MANIFEST_NAME,
    ManifestError,
    read_manifest,
    resolve_path,
    salted_group_id,
    select,
    staged_dataset,
    write_manifest,
)

ROWS = [
    ("images/b.png", "normal", "train", "p1", ""),
    ("images/a.png", "normal", "train", "p1", ""),
    ("images/c.png", "abnormal", "test", "p2", "nodule"),
    ("images/d.png", "normal", "test", "p3", ""),
    ("images/e.png", "abnormal", "val", "p4", "effusion"),
]


def frame(rows=ROWS) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(COLUMNS))


def test_write_is_sorted_ordered_and_byte_stable(tmp_path):
    shuffled = frame().sample(frac=1.0, random_state=3)[["group", "anomaly_type", "label", "split", "path"]]
    write_manifest(shuffled, tmp_path / "one")
    write_manifest(frame(), tmp_path / "two")
    one = (tmp_path / "one" / MANIFEST_NAME).read_bytes()
    assert one == (tmp_path / "two" / MANIFEST_NAME).read_bytes()
    lines = one.decode().splitlines()
    assert lines[0] == "path,label,split,group,anomaly_type"
    assert [line.split(",")[0] for line in lines[1:]] == sorted(row[0] for row in ROWS)
    assert b"\r" not in one


def test_read_round_trips_strings_and_keeps_empty_anomaly_type(tmp_path):
    write_manifest(frame(), tmp_path)
    df = read_manifest(tmp_path)
    assert list(df.columns) == list(COLUMNS)
    assert df.loc[df["path"] == "images/a.png", "anomaly_type"].item() == ""
    assert all(isinstance(value, str) for value in df.to_numpy().ravel())


def test_read_adds_missing_optional_anomaly_type(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text("path,label,split,group\nimages/a.png,normal,train,g\n")
    assert read_manifest(tmp_path)["anomaly_type"].tolist() == [""]


@pytest.mark.parametrize(
    "bad, reason",
    [("../outside.png", "'..'"), ("images/../../x.png", "'..'"), ("/etc/passwd", "absolute"),
     ("C:\\data\\x.png", "absolute"), ("", "empty")],
)
def test_read_rejects_paths_that_escape_naming_the_line(tmp_path, bad, reason):
    (tmp_path / MANIFEST_NAME).write_text(
        f'path,label,split,group,anomaly_type\nimages/ok.png,normal,train,g,\n"{bad}",normal,train,g,\n'
    )
    with pytest.raises(ManifestError) as err:
        read_manifest(tmp_path)
    message = str(err.value)
    assert "line 3" in message and reason in message and "relative to" in message


def test_read_names_missing_columns_and_missing_file(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("path,label\nimages/a.png,normal\n")
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['split', 'group'\]"):
        read_manifest(tmp_path)


def test_write_refuses_unsafe_paths(tmp_path):
    with pytest.raises(ManifestError, match="'..'"):
        write_manifest(frame([("../x.png", "normal", "train", "g", "")]), tmp_path)


def test_resolve_path_joins_inside_and_refuses_escapes(tmp_path):
    assert resolve_path(tmp_path, "images/a.png") == tmp_path / "images" / "a.png"
    for bad in ("../a.png", "/abs/a.png", "a/../../b.png"):
        with pytest.raises(ManifestError):
            resolve_path(tmp_path, bad)


def test_select_filters_and_keeps_the_original_index():
    df = frame()
    train = select(df, split="train", label="normal")
    assert sorted(train["path"]) == ["images/a.png", "images/b.png"]
    assert list(train.index) == [0, 1]
    assert select(df, anomaly_types="nodule")["path"].tolist() == ["images/c.png"]
    assert len(select(df, anomaly_types=["nodule", "effusion"])) == 2
    assert len(select(df)) == len(df)
    with pytest.raises(ValueError, match="split must be one of"):
        select(df, split="training")
    with pytest.raises(ValueError, match="label must be one of"):
        select(df, label="anomalous")


def test_salted_group_id_is_stable_salted_and_hides_the_id():
    gid = salted_group_id("PAT-123", "s1")
    assert gid == salted_group_id("PAT-123", "s1")
    assert gid != salted_group_id("PAT-123", "s2") != salted_group_id("PAT-124", "s1")
    assert "123" not in gid and len(gid) == 16


def test_staged_dataset_publishes_only_on_success(tmp_path):
    out = tmp_path / "data"
    with staged_dataset(out) as stage:
        (stage / "v1.txt").write_text("one")
    assert (out / "v1.txt").read_text() == "one"
    with pytest.raises(RuntimeError), staged_dataset(out, overwrite=True) as stage:
        (stage / "v2.txt").write_text("two")
        raise RuntimeError("import failed half-way")
    assert sorted(p.name for p in out.iterdir()) == ["v1.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["data"]
    with pytest.raises(FileExistsError, match="overwrite=True"), staged_dataset(out):
        pass
    with staged_dataset(out, overwrite=True) as stage:
        (stage / "v2.txt").write_text("two")
    assert sorted(p.name for p in out.iterdir()) == ["v2.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["data"]
