"""The single decoder: every format to 8-bit L/RGB, clear errors, the bomb guard, and DICOM."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_layer.dicom import dicom_group_id, read_dicom
from data_layer.images import pixel_hash, read_image, write_png
from data_layer.pixels import ImageReadError


def save(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path


@pytest.fixture
def gray() -> np.ndarray:
    return np.arange(24 * 32, dtype=np.uint32).reshape(24, 32).astype(np.uint8)


def test_png_gray_and_rgb_pass_through(tmp_path, gray):
    image = read_image(save(Image.fromarray(gray), tmp_path / "g.png"))
    assert image.mode == "L" and image.size == (32, 24)
    np.testing.assert_array_equal(np.asarray(image), gray)
    rgb = np.stack([gray, 255 - gray, gray // 2], axis=-1)
    decoded = read_image(save(Image.fromarray(rgb), tmp_path / "c.png"))
    np.testing.assert_array_equal(np.asarray(decoded), rgb)


@pytest.mark.parametrize("mode, expected", [("RGBA", "RGB"), ("P", "RGB"), ("LA", "L"), ("1", "L")])
def test_other_8bit_modes_become_l_or_rgb(tmp_path, gray, mode, expected):
    image = Image.fromarray(gray).convert(mode)
    assert read_image(save(image, tmp_path / "x.png")).mode == expected


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_goes_through_the_robust_window_to_8bit(tmp_path, suffix):
    values = np.linspace(1000, 3000, 24 * 32).reshape(24, 32).astype(np.uint16)
    path = save(Image.fromarray(values), tmp_path / f"deep{suffix}")
    array = np.asarray(read_image(path))
    assert array.dtype == np.uint8 and array.min() == 0 and array.max() == 255
    assert np.all(np.diff(array.astype(int), axis=1) >= 0)
    low, high = np.percentile(values, (0.5, 99.5))
    middle = values[12, 16]
    assert abs(int(array[12, 16]) - (middle - low) * 255 / (high - low)) <= 1


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_one_hot_pixel_does_not_rescale_a_16bit_image(tmp_path, suffix):
    """A 12-bit detector image with one stuck pixel at 65535: min..max scaling would darken every
    other pixel about 16-fold; the robust window leaves them where they were."""
    values = (np.random.default_rng(0).random((48, 48)) * 3000 + 500).astype(np.uint16)
    hot = values.copy()
    hot[5, 7] = 65535
    clean = np.asarray(read_image(save(Image.fromarray(values), tmp_path / f"clean{suffix}"))).astype(int)
    spoiled = np.asarray(read_image(save(Image.fromarray(hot), tmp_path / f"hot{suffix}"))).astype(int)
    others = np.ones(values.shape, bool)
    others[5, 7] = False
    assert np.abs(clean - spoiled)[others].max() <= 1 and spoiled[5, 7] == 255
    min_max = (hot.astype(float) - hot.min()) * 255 / (hot.max() - hot.min())
    assert np.abs(clean - min_max)[others].mean() > 100  # what the old per-image min..max did


def test_a_sparse_image_keeps_its_few_bright_pixels(tmp_path):
    values = np.zeros((40, 40), np.uint16)
    values[3, 4] = 1000
    array = np.asarray(read_image(save(Image.fromarray(values), tmp_path / "sparse.png")))
    assert array[3, 4] == 255 and array.sum() == 255


def test_jpeg_decodes(tmp_path, gray):
    image = read_image(save(Image.fromarray(gray), tmp_path / "x.jpg"))
    assert image.mode == "L" and image.size == (32, 24)


def test_npy_rules(tmp_path, gray):
    np.save(tmp_path / "u8.npy", gray)
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "u8.npy")), gray)
    np.save(tmp_path / "hw1.npy", gray[:, :, None])
    assert read_image(tmp_path / "hw1.npy").mode == "L"
    np.save(tmp_path / "rgb.npy", np.stack([gray] * 3, axis=-1))
    assert read_image(tmp_path / "rgb.npy").mode == "RGB"
    np.save(tmp_path / "float.npy", np.array([[-1.0, 0.0], [0.5, 1.0]]))
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "float.npy")), [[0, 127], [191, 255]])  # 0.5..99.5th pct
    np.save(tmp_path / "nan.npy", np.array([[np.nan, 0.0], [0.0, 1.0]]))
    np.save(tmp_path / "rgba.npy", np.zeros((4, 4, 4), np.uint8))
    np.save(tmp_path / "flat.npy", np.zeros(16, np.uint8))
    np.save(tmp_path / "text.npy", np.array([["a", "b"], ["c", "d"]]))
    np.save(tmp_path / "complex.npy", np.zeros((4, 4), complex))
    np.save(tmp_path / "empty.npy", np.zeros((0, 4), np.uint8))
    for name, reason in (("nan", "NaN"), ("rgba", "shape"), ("flat", "shape"), ("text", "real numbers"),
                         ("complex", "real numbers"), ("empty", "no pixels")):
        with pytest.raises(ImageReadError, match=f"{name}.npy.*{reason}"):
            read_image(tmp_path / f"{name}.npy")


def test_unsupported_and_missing_files_name_the_file(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ImageReadError, match=r"notes\.txt: unsupported file type '\.txt'"):
        read_image(tmp_path / "notes.txt")
    with pytest.raises(ImageReadError, match=r"gone\.png: file not found"):
        read_image(tmp_path / "gone.png")


def test_corrupt_and_truncated_png_raise_naming_the_file(tmp_path, gray):
    (tmp_path / "garbage.png").write_bytes(b"this is not a png at all")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    data = save(Image.fromarray(noise), tmp_path / "full.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    for name in ("garbage.png", "truncated.png"):
        with pytest.raises(ImageReadError, match=f"{name}: cannot decode") as err:
            read_image(tmp_path / name)
        assert "remove it" in str(err.value)


def png_claiming_size(path: Path, width: int, height: int) -> Path:
    """A tiny real PNG whose header claims width x height (valid CRC): a decompression bomb."""
    data = bytearray(save(Image.new("L", (8, 8)), path).read_bytes())
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = ihdr[4:12]
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    path.write_bytes(bytes(data))
    return path


def test_bomb_guard_refuses_from_the_header_before_decoding(tmp_path, monkeypatch):
    bomb = png_claiming_size(tmp_path / "bomb.png", 9000, 9000)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("pixels were decoded"))
    with pytest.raises(ImageReadError, match=r"bomb\.png: 9000x9000 = 81,000,000 pixels exceeds"):
        read_image(bomb)


def test_bomb_guard_is_configurable_for_npy_and_dicom(tmp_path, gray, ramp, write_dicom):
    np.save(tmp_path / "big.npy", gray)
    with pytest.raises(ImageReadError, match="decompression-bomb guard"):
        read_image(tmp_path / "big.npy", max_pixels=100)
    dcm = write_dicom(tmp_path / "big.dcm", ramp)
    with pytest.raises(ImageReadError, match="decompression-bomb guard"):
        read_image(dcm, max_pixels=100)
    assert read_image(dcm, max_pixels=16 * 20).size == (20, 16)


def test_pixel_hash_depends_on_pixels_not_on_format(tmp_path, gray):
    from_png = read_image(save(Image.fromarray(gray), tmp_path / "a.png"))
    np.save(tmp_path / "a.npy", gray)
    assert pixel_hash(from_png) == pixel_hash(read_image(tmp_path / "a.npy"))
    assert pixel_hash(from_png) != pixel_hash(from_png.convert("RGB"))
    assert pixel_hash(from_png) != pixel_hash(Image.fromarray(gray.T.copy()))


def test_write_png_is_byte_deterministic(tmp_path, gray):
    write_png(Image.fromarray(gray), tmp_path / "a" / "x.png")
    write_png(Image.fromarray(gray.copy()), tmp_path / "b" / "x.png")
    assert (tmp_path / "a" / "x.png").read_bytes() == (tmp_path / "b" / "x.png").read_bytes()


# --- DICOM ---------------------------------------------------------------------------------------


def test_dicom_monochrome2_maps_the_stored_bit_range(tmp_path, ramp, write_dicom):
    image = read_image(write_dicom(tmp_path / "m2.dcm", ramp))
    array = np.asarray(image)
    assert image.mode == "L" and image.size == (20, 16)
    np.testing.assert_array_equal(array, np.rint(ramp / 4095 * 255).astype(np.uint8))


def test_dicom_monochrome1_is_inverted(tmp_path, ramp, write_dicom):
    normal = np.asarray(read_dicom(write_dicom(tmp_path / "m2.dcm", ramp)))
    inverted = np.asarray(read_dicom(write_dicom(tmp_path / "m1.dcm", ramp, photometric="MONOCHROME1")))
    np.testing.assert_array_equal(inverted, 255 - normal)
    assert inverted[0, 0] == 255 and inverted[-1, -1] == 0


def test_dicom_rescale_and_window(tmp_path, write_dicom):
    stored = np.array([[0, 500, 1000, 1250, 1500, 2000, 4095]], dtype=np.uint16)
    # values = 2 * stored - 1000; window [1000, 2000] covers stored 1000..1500
    path = write_dicom(tmp_path / "w.dcm", stored, RescaleSlope=2, RescaleIntercept=-1000,
                       WindowCenter=1500, WindowWidth=1000)
    array = np.asarray(read_image(path))[0]
    assert array[0] == array[1] == array[2] == 0
    assert array[4] == array[5] == array[6] == 255
    assert 120 <= array[3] <= 135


def test_dicom_rescale_without_window_keeps_relative_levels(tmp_path, ramp, write_dicom):
    plain = np.asarray(read_image(write_dicom(tmp_path / "a.dcm", ramp)))
    rescaled = np.asarray(read_image(write_dicom(tmp_path / "b.dcm", ramp, RescaleSlope=3,
                                                 RescaleIntercept=-1024)))
    np.testing.assert_array_equal(plain, rescaled)


def test_dicom_multiframe_is_rejected_with_a_clear_message(tmp_path, ramp, write_dicom):
    path = write_dicom(tmp_path / "cine.dcm", np.stack([ramp, ramp]), frames=2)
    with pytest.raises(ImageReadError, match=r"cine\.dcm: multi-frame DICOM \(2 frames\)"):
        read_image(path)


@pytest.mark.parametrize(("tags", "reason"), [
    ({"BitsAllocated": None}, "Bits Allocated"),
    ({"PhotometricInterpretation": None}, "Photometric Interpretation"),
    ({"SamplesPerPixel": 3}, "Planar Configuration"),
    ({"RescaleSlope": "nan", "RescaleIntercept": 0}, "NaN or infinite"),
])
def test_odd_pixel_attributes_raise_naming_the_file(tmp_path, ramp, write_dicom, tags, reason):
    """pydicom answers these with AttributeError or TypeError, or decodes NaN: each is an ImageReadError."""
    path = write_dicom(tmp_path / "odd.dcm", ramp, **tags)
    with pytest.raises(ImageReadError, match=rf"odd\.dcm: cannot decode .*{reason}"):
        read_image(path)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_truncated_dicom_raises_naming_the_file(tmp_path, ramp, write_dicom, keep):
    data = write_dicom(tmp_path / "full.dcm", ramp).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ImageReadError, match=r"cut\.dcm: .*(truncated|cannot decode)"):
        read_image(tmp_path / "cut.dcm")


def test_non_dicom_bytes_raise(tmp_path):
    (tmp_path / "fake.dcm").write_bytes(b"\x00" * 64 + b"hello")
    with pytest.raises(ImageReadError, match=r"fake\.dcm: cannot decode"):
        read_image(tmp_path / "fake.dcm")


def test_group_id_is_a_salted_hash_and_never_the_patient_id(tmp_path, ramp, write_dicom):
    a1 = write_dicom(tmp_path / "a1.dcm", ramp, patient_id="MRN-998877")
    a2 = write_dicom(tmp_path / "a2.dcm", ramp, patient_id="MRN-998877")
    b = write_dicom(tmp_path / "b.dcm", ramp, patient_id="MRN-112233")
    gid = dicom_group_id(a1, "pepper")
    assert gid == dicom_group_id(a2, "pepper") != dicom_group_id(b, "pepper")
    assert gid != dicom_group_id(a1, "salt") and "998877" not in gid
    anonymous = write_dicom(tmp_path / "anon.dcm", ramp, patient_id="")
    with pytest.raises(ImageReadError, match=r"anon\.dcm: DICOM file has no PatientID"):
        dicom_group_id(anonymous, "pepper")


def test_errors_never_mention_patient_tags(tmp_path, ramp, write_dicom):
    path = write_dicom(tmp_path / "cine.dcm", np.stack([ramp, ramp]), frames=2, patient_id="MRN-4242")
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert "4242" not in str(err.value) and "Doe" not in str(err.value)


def test_files_without_a_suffix_are_read_by_their_magic_bytes(tmp_path):
    from PIL import Image as PILImage

    from data_layer.images import is_image_file

    PILImage.fromarray(np.full((8, 8), 7, dtype=np.uint8)).save(tmp_path / "scan.png")
    (tmp_path / "scan.png").rename(tmp_path / "scan")
    assert is_image_file(tmp_path / "scan") and read_image(tmp_path / "scan").size == (8, 8)
    (tmp_path / "readme").write_text("not an image")
    assert not is_image_file(tmp_path / "readme")
