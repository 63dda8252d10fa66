"""Every importer on small files written by the tests in the sources' real on-disk formats."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
import torchvision.datasets.cifar
import torchvision.datasets.svhn
from PIL import Image

from data_layer.images import read_image
from data_layer.importers import (
    MEDMNIST_URL,
    SourceUnavailableError,
    assign_splits,
    import_camelyon16,
    import_cifar10,
    import_csv,
    import_folder,
    import_medmnist,
    import_nih,
    import_svhn,
)
from data_layer.manifest import ManifestError, read_manifest, salted_group_id


def png(path: Path, value: int = 0, size: tuple[int, int] = (12, 10), mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value,) * len(mode)).save(path)
    return path


def assert_groups_in_one_split(df: pd.DataFrame) -> None:
    assert df.groupby("group")["split"].nunique().max() == 1


# --- folder layout -------------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path, ramp, write_dicom) -> Path:
    root = tmp_path / "hospital"
    for i in range(12):
        png(root / "normal" / f"n{i:02d}.png", i)
    for i in range(3):
        png(root / "normal" / "patient-7" / f"v{i}.png", 100 + i)
    png(root / "abnormal" / "nodule" / "x1.png", 200)
    png(root / "abnormal" / "nodule" / "patient-7" / "late.png", 201)
    png(root / "abnormal" / "loose.png", 202)
    (root / "abnormal" / "effusion").mkdir(parents=True)
    write_dicom(root / "abnormal" / "effusion" / "a.dcm", ramp, patient_id="MRN-1")
    write_dicom(root / "abnormal" / "effusion" / "b.dcm", ramp, patient_id="MRN-1")
    (root / "normal" / ".DS_Store").write_bytes(b"junk")
    (root / "normal" / "README.txt").write_text("not an image")
    return root


def test_folder_labels_types_groups_and_copies(folder, tmp_path):
    out = import_folder(folder, tmp_path / "ds", salt="s3cret", seed=1)
    df = read_manifest(out).set_index("path")
    assert len(df) == 20
    fields = ["label", "group", "anomaly_type"]
    assert df.loc["images/normal/n03.png", fields].tolist() == ["normal", "n03", ""]
    assert df.loc["images/normal/patient-7/v1.png", "group"] == "patient-7"
    assert df.loc["images/abnormal/nodule/patient-7/late.png", ["group", "anomaly_type"]].tolist() == [
        "patient-7", "nodule"]
    assert df.loc["images/abnormal/loose.png", ["label", "anomaly_type"]].tolist() == ["abnormal", ""]
    dicom_group = salted_group_id("MRN-1", "s3cret")
    assert set(df.loc[df.anomaly_type == "effusion", "group"]) == {dicom_group}
    assert (out / "images/normal/n03.png").read_bytes() == (folder / "normal/n03.png").read_bytes()
    assert "MRN-1" not in (out / "manifest.csv").read_text()


def test_folder_split_is_group_aware_and_train_is_normal_only(folder, tmp_path):
    df = read_manifest(import_folder(folder, tmp_path / "ds", salt="s", seed=1))
    assert_groups_in_one_split(df)
    assert set(df.loc[df.split == "train", "label"]) == {"normal"}
    assert df.loc[df.group == "patient-7", "split"].isin(["val", "test"]).all()
    assert set(df.split) == {"train", "val", "test"}
    again = read_manifest(import_folder(folder, tmp_path / "again", salt="s", seed=1))
    pd.testing.assert_frame_equal(df, again)


def test_folder_with_dicom_needs_a_salt(folder, tmp_path):
    with pytest.raises(ValueError, match=r"a\.dcm: DICOM files are grouped by a salted hash"):
        import_folder(folder, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_folder_with_split_subfolders_keeps_them(tmp_path):
    root = tmp_path / "src"
    png(root / "train" / "normal" / "a.png")
    png(root / "val" / "abnormal" / "tumor" / "b.png")
    png(root / "test" / "normal" / "c.png")
    png(root / "test" / "abnormal" / "tumor" / "d.png")
    df = read_manifest(import_folder(root, tmp_path / "ds")).set_index("path")
    assert df.loc["images/train/normal/a.png", "split"] == "train"
    assert df.loc["images/val/abnormal/tumor/b.png", ["split", "label", "anomaly_type"]].tolist() == [
        "val", "abnormal", "tumor"]
    assert df.loc["images/test/abnormal/tumor/d.png", "split"] == "test"


def test_folder_without_the_layout_is_refused(tmp_path):
    png(tmp_path / "src" / "images" / "a.png")
    with pytest.raises(SourceUnavailableError, match="expected a normal/ and/or abnormal/"):
        import_folder(tmp_path / "src", tmp_path / "ds")


def test_assign_splits_is_seeded_group_aware_and_proportional():
    groups = [f"g{i // 2}" for i in range(400)] + [f"a{i}" for i in range(60)]
    abnormal = [False] * 400 + [True] * 60
    splits = assign_splits(groups, abnormal, (0.6, 0.2, 0.2), seed=3)
    assert splits == assign_splits(groups, abnormal, (0.6, 0.2, 0.2), seed=3)
    assert splits != assign_splits(groups, abnormal, (0.6, 0.2, 0.2), seed=4)
    table = pd.DataFrame({"group": groups, "split": splits, "abnormal": abnormal})
    assert_groups_in_one_split(table)
    normal_share = table[~table.abnormal].split.value_counts(normalize=True)
    assert normal_share["train"] == pytest.approx(0.6, abs=0.01)
    assert set(table[table.abnormal].split) == {"val", "test"}
    assert (table[table.abnormal].split == "val").mean() == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match="fractions"):
        assign_splits(groups, abnormal, (0.5, -0.1, 0.6))


# --- CSV -----------------------------------------------------------------------------------------


def test_csv_with_column_and_label_mapping(tmp_path):
    src = tmp_path / "src"
    for name in ("a", "b", "c"):
        png(src / "pics" / f"{name}.png")
    (src / "list.csv").write_text(
        "file,finding,partition,patient,kind\n"
        "pics/a.png,0,train,p1,\npics/b.png,1,test,p2,mass\npics/c.png,0,test,p3,\n"
    )
    columns = {"path": "file", "label": "finding", "split": "partition", "group": "patient",
               "anomaly_type": "kind"}
    label_map = {"0": "normal", "1": "abnormal"}
    out = import_csv(src / "list.csv", tmp_path / "ds", columns=columns, label_map=label_map)
    df = read_manifest(out)
    assert df.values.tolist() == [
        ["images/pics/a.png", "normal", "train", "p1", ""],
        ["images/pics/b.png", "abnormal", "test", "p2", "mass"],
        ["images/pics/c.png", "normal", "test", "p3", ""],
    ]


def test_csv_without_split_or_group_columns_gets_assigned_splits(tmp_path):
    rows = [f"img{i}.png,{'abnormal' if i >= 20 else 'normal'}" for i in range(24)]
    for i in range(24):
        png(tmp_path / f"img{i}.png")
    (tmp_path / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    df = read_manifest(import_csv(tmp_path / "list.csv", tmp_path / "ds"))
    assert df.group.nunique() == 24 and set(df.split) == {"train", "val", "test"}
    assert set(df.loc[df.label == "abnormal", "split"]) <= {"val", "test"}


@pytest.mark.parametrize(
    "row, error, message",
    [
        ("a.png,maybe", ManifestError, r"list\.csv line 3: label 'maybe'.*label_map"),
        ("../outside.png,normal", ManifestError, r"list\.csv line 3: '\.\./outside\.png' lies outside"),
        ("gone.png,normal", SourceUnavailableError, r"list\.csv line 3: image .*gone\.png not found"),
    ],
)
def test_csv_refuses_what_it_cannot_map(tmp_path, row, error, message):
    src = tmp_path / "src"
    png(src / "a.png")
    png(tmp_path / "outside.png")
    (src / "list.csv").write_text(f"path,label\na.png,normal\n{row}\n")
    with pytest.raises(error, match=message):
        import_csv(src / "list.csv", tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


# --- MedMNIST ------------------------------------------------------------------------------------


@pytest.fixture
def medmnist_npz(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 6), ("val", 3), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1).astype(np.uint8)
    path = tmp_path / "src" / "pneumoniamnist.npz"
    path.parent.mkdir()
    np.savez(path, **arrays)
    return path


def test_medmnist_keeps_official_splits_and_pixels(medmnist_npz, tmp_path):
    df = read_manifest(import_medmnist(medmnist_npz, tmp_path / "ds"))
    assert df.groupby(["split", "label"]).size().to_dict() == {
        ("test", "abnormal"): 2, ("test", "normal"): 2, ("train", "abnormal"): 3,
        ("train", "normal"): 3, ("val", "abnormal"): 1, ("val", "normal"): 2}
    assert set(df.loc[df.label == "abnormal", "anomaly_type"]) == {"pneumonia"}
    row = df[df.path == "images/val/val-000001.png"].iloc[0]
    assert row.label == "abnormal"
    with np.load(medmnist_npz) as data:
        expected = data["val_images"][1]
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "ds" / row.path)), expected)


def test_medmnist_offline_names_the_url_and_where_to_put_the_file(tmp_path):
    missing = tmp_path / "pneumoniamnist_64.npz"
    with pytest.raises(SourceUnavailableError) as err:
        import_medmnist(missing, tmp_path / "ds")
    assert MEDMNIST_URL.format(name="pneumoniamnist_64.npz") in str(err.value)
    assert str(missing) in str(err.value)
    with pytest.raises(SourceUnavailableError, match=r"cannot download http://127\.0\.0\.1:9/x\.npz"):
        import_medmnist(missing, tmp_path / "ds", download=True, url="http://127.0.0.1:9/x.npz")
    assert not missing.exists() and not missing.with_name(missing.name + ".part").exists()


def test_medmnist_download_fetches_then_imports(medmnist_npz, tmp_path):
    target = tmp_path / "cache" / "pneumoniamnist.npz"
    out = import_medmnist(target, tmp_path / "ds", download=True, url=medmnist_npz.as_uri())
    assert target.read_bytes() == medmnist_npz.read_bytes()
    assert len(read_manifest(out)) == 13


# --- CIFAR10 / SVHN ------------------------------------------------------------------------------

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture
def cifar_root(tmp_path, monkeypatch) -> Path:
    """The real python-pickle layout, 4 images per batch; md5 checks disabled (fake contents)."""
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for index, name in enumerate(names):
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                 "labels": [(index * 4 + j) % 10 for j in range(4)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": CIFAR_CLASSES}, protocol=2))
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    return tmp_path / "cifar"


def test_cifar10_one_vs_rest(cifar_root, tmp_path):
    df = read_manifest(import_cifar10(cifar_root, tmp_path / "ds", normal_class="cat", val_class=7))
    train, val, test = (df[df.split == s] for s in ("train", "val", "test"))
    assert len(train) == 2 and set(train.label) == {"normal"}
    assert len(val) == 2 and set(val.anomaly_type) == {"horse"} and set(val.label) == {"abnormal"}
    assert test[["label", "anomaly_type"]].values.tolist() == [
        ["abnormal", "airplane"], ["abnormal", "automobile"], ["abnormal", "bird"], ["normal", ""]]
    first = train.path.iloc[0]
    index = int(first.rsplit("-", 1)[1].split(".")[0])
    batch = pickle.loads((cifar_root / "cifar-10-batches-py" / f"data_batch_{index // 4 + 1}").read_bytes())
    expected = batch["data"][index % 4].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "ds" / first)), expected)


def test_cifar10_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(SourceUnavailableError, match="CIFAR10 is not available under .*download=True"):
        import_cifar10(tmp_path / "nothing", tmp_path / "ds", normal_class=0)


def test_cifar10_unknown_class_is_refused(cifar_root, tmp_path):
    with pytest.raises(ValueError, match="unknown class 'kitten'"):
        import_cifar10(cifar_root, tmp_path / "ds", normal_class="kitten")


def test_svhn_one_vs_rest_from_mat_files(tmp_path, monkeypatch):
    root = tmp_path / "svhn"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, digits in (("train", [10, 1, 1, 2, 10]), ("test", [10, 3, 1, 10])):
        images = rng.integers(0, 256, (32, 32, 3, len(digits)), dtype=np.uint8)
        scipy.io.savemat(root / f"{name}_32x32.mat", {"X": images, "y": np.array(digits).reshape(-1, 1)})
    monkeypatch.setattr(torchvision.datasets.svhn, "check_integrity", lambda *args, **kwargs: True)
    df = read_manifest(import_svhn(root, tmp_path / "ds", normal_class=0, val_class="1"))
    assert df.groupby(["split", "label"]).size().to_dict() == {
        ("train", "normal"): 2, ("val", "abnormal"): 2, ("test", "normal"): 2, ("test", "abnormal"): 2}
    assert set(df.loc[df.split == "test", "anomaly_type"]) == {"", "3", "1"}
    image = read_image(tmp_path / "ds" / df[df.split == "train"].path.iloc[0])
    source = scipy.io.loadmat(root / "train_32x32.mat")["X"][:, :, :, 0]
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), source)


# --- NIH ChestX-ray14 ----------------------------------------------------------------------------

NIH_ROWS = [
    # image, findings, patient, view, list
    ("00000001_000.png", "No Finding", "1", "PA", "train"),
    ("00000001_001.png", "Infiltration", "1", "PA", "train"),
    ("00000002_000.png", "No Finding", "2", "PA", "train"),
    ("00000003_000.png", "Effusion|Infiltration", "3", "PA", "train"),
    ("00000004_000.png", "No Finding", "4", "AP", "train"),
    ("00000005_000.png", "No Finding", "5", "PA", "test"),
    ("00000006_000.png", "Effusion|Mass", "6", "PA", "test"),
    ("00000007_000.png", "Nodule", "7", "AP", "test"),
] + [(f"0000001{i}_000.png", "No Finding", f"1{i}", "PA", "train") for i in range(6)]


@pytest.fixture
def nih_root(tmp_path) -> Path:
    root = tmp_path / "nih"
    root.mkdir()
    records = []
    for k, (name, findings, patient, view, _) in enumerate(NIH_ROWS):
        folder = root / ("images_001" if k % 2 else "images_002") / "images"
        png(folder / name, 40 + k, size=(64, 64), mode="RGBA" if k == 2 else "L")
        records.append({"Image Index": name, "Finding Labels": findings, "Follow-up #": 0,
                        "Patient ID": patient, "Patient Age": 50, "Patient Gender": "F",
                        "View Position": view, "OriginalImage[Width": 64, "Height]": 64})
    pd.DataFrame(records).to_csv(root / "Data_Entry_2017.csv", index=False)
    for listing in ("train", "test"):
        names = [row[0] for row in NIH_ROWS if row[4] == listing]
        list_name = "train_val_list.txt" if listing == "train" else "test_list.txt"
        (root / list_name).write_text("\n".join(names) + "\n")
    return root


def test_nih_pa_protocol_resize_and_hashed_patients(nih_root, tmp_path):
    df = read_manifest(import_nih(nih_root, tmp_path / "ds", salt="pepper", size=30))
    assert set(df.path.str.rsplit("/", n=1).str[1]) == {
        "00000001_000.png", "00000002_000.png", "00000005_000.png", "00000006_000.png",
        *(f"0000001{i}_000.png" for i in range(6))}
    assert set(df.loc[df.split == "train", "label"]) == {"normal"}
    test = df[df.split == "test"].set_index("path")
    assert test.loc["images/test/00000006_000.png", ["label", "anomaly_type"]].tolist() == [
        "abnormal", "Effusion|Mass"]
    assert test.loc["images/test/00000005_000.png", "label"] == "normal"
    group = df.loc[df.path == "images/train/00000002_000.png", "group"].item()
    assert group == salted_group_id("2", "pepper")
    image = read_image(tmp_path / "ds" / "images/train/00000002_000.png")
    assert image.mode == "L" and image.size == (30, 30)
    assert np.asarray(image).mean() == pytest.approx(42, abs=1)


def test_nih_ap_view_and_default_300px(nih_root, tmp_path):
    df = read_manifest(import_nih(nih_root, tmp_path / "ds", salt="s", view="AP"))
    assert df[["split", "label", "anomaly_type"]].values.tolist() == [
        ["test", "abnormal", "Nodule"], ["train", "normal", ""]]
    assert read_image(tmp_path / "ds" / df.path.iloc[1]).size == (300, 300)


def test_nih_patient_level_validation_split(nih_root, tmp_path):
    out = import_nih(nih_root, tmp_path / "ds", salt="s", size=16, val_fraction=0.5,
                     val_anomaly_label="Infiltration", seed=0)
    df = read_manifest(out)
    assert_groups_in_one_split(df)
    val = df[df.split == "val"]
    assert len(val) and set(val.label) <= {"normal", "abnormal"}
    assert set(val.loc[val.label == "abnormal", "anomaly_type"]) <= {"Infiltration"}
    assert "Effusion|Infiltration" not in set(df.anomaly_type)
    patient_1 = salted_group_id("1", "s")
    assert set(df.loc[df.group == patient_1, "split"]) in ({"val"}, {"train"})


def test_nih_missing_files_are_named(nih_root, tmp_path):
    (nih_root / "images_002" / "images" / "00000002_000.png").unlink()
    with pytest.raises(SourceUnavailableError, match=r"1 listed images are missing.*00000002_000\.png"):
        import_nih(nih_root, tmp_path / "ds", salt="s")
    (nih_root / "test_list.txt").unlink()
    with pytest.raises(SourceUnavailableError, match=r"test_list\.txt not found"):
        import_nih(nih_root, tmp_path / "ds", salt="s")


def test_nih_corrupt_image_fails_the_whole_import_cleanly(nih_root, tmp_path):
    (nih_root / "images_002" / "images" / "00000002_000.png").write_bytes(b"broken")
    with pytest.raises(Exception, match=r"00000002_000\.png: cannot decode"):
        import_nih(nih_root, tmp_path / "ds", salt="s", size=16)
    assert [p.name for p in tmp_path.iterdir()] == ["nih"]


# --- Camelyon16 ----------------------------------------------------------------------------------


def test_camelyon16_patch_folders(tmp_path):
    root = tmp_path / "cam"
    layout = {"normal/normal_001": 2, "normal/normal_002": 1, "tumor_train/tumor_078": 2,
              "test/normal/test_001": 1, "test/tumor/test_002": 2}
    for folder, n in layout.items():
        for i in range(n):
            png(root / folder / f"patch_{i}.jpg", 30 * i, size=(24, 24), mode="RGB")
    df = read_manifest(import_camelyon16(root, tmp_path / "ds"))
    summary = df.groupby(["split", "label", "group", "anomaly_type"]).size().to_dict()
    assert summary == {("train", "normal", "normal_001", ""): 2, ("train", "normal", "normal_002", ""): 1,
                       ("val", "abnormal", "tumor_078", "tumor"): 2, ("test", "normal", "test_001", ""): 1,
                       ("test", "abnormal", "test_002", "tumor"): 2}
    copied = tmp_path / "ds" / "images/test/tumor/test_002/patch_1.jpg"
    assert copied.read_bytes() == (root / "test/tumor/test_002/patch_1.jpg").read_bytes()


def test_camelyon16_requires_its_layout(tmp_path):
    png(tmp_path / "cam" / "normal" / "s1" / "p.jpg", mode="RGB")
    with pytest.raises(SourceUnavailableError, match=r"test/normal not found"):
        import_camelyon16(tmp_path / "cam", tmp_path / "ds")
