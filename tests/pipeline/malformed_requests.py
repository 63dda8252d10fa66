"""Hypothesis strategies of malformed requests to the served DPA: each draws a request body that
a correct server answers 4xx with a message. Every strategy is malformed by construction (no draw
can be a valid request), so a 200 is a finding too.

The images are built from valid files of every format: random and truncated bytes, PNG headers
claiming any size without pixel data, and DICOM files with one attribute made absurd or removed, NPY arrays that hold no image.
Not drawn: JSON nested deeper than Python's recursion limit or integers over 4,300 digits, which
MLflow's JSON parsing turns into a 500 before the model sees the request (docs/serving.md).
"""

from __future__ import annotations

import base64
import io
import json
import string
import struct
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import pydicom
from hypothesis import strategies as st

IMAGE_COLUMN, PATH_COLUMN = "image", "path"
DICOM_PLACEHOLDER = "+1.2345e+67"
"""A DS value unlikely to occur elsewhere in a file: swapped for a non-numeric text of equal length."""
PHOTOMETRIC_TERMS = frozenset({
    "MONOCHROME1", "MONOCHROME2", "PALETTE", "RGB", "HSV", "ARGB", "CMYK", "YBR", "FULL", "PARTIAL",
    "ICT", "RCT",
})


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def images_payload(cells: list, column: str = IMAGE_COLUMN, **params) -> dict:
    payload = {"dataframe_split": {"columns": [column], "data": [[cell] for cell in cells]}}
    return {**payload, "params": params} if params else payload


def png_header(width: int, height: int, bit_depth: int = 8, colour_type: int = 0) -> bytes:
    """A PNG whose header claims width × height pixels and has no pixel data (a bomb probe)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def malformed_requests(valid_files: Sequence[bytes], valid_dicom: bytes) -> dict[str, st.SearchStrategy[bytes]]:
    """Request bodies by kind (so that a run with a few examples per kind covers every kind): bad
    JSON, wrong shapes and types, `path` rows (refused by default), and tables with one malformed
    image among up to three valid ones."""
    bad_images = {
        "random bytes": st.binary(max_size=300).map(b64),
        "truncated files": _truncated(valid_files).map(b64),
        "PNG headers": st.builds(png_header, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
                                 st.sampled_from([1, 2, 4, 8, 16, 0, 3, 255]), st.sampled_from([0, 2, 3, 4, 6, 1, 7])).map(b64),
        "NPY arrays": odd_npys().map(b64),
        "DICOM without an attribute": dicoms_missing_an_attribute(valid_dicom).map(b64),
        "DICOM with an odd attribute": odd_dicoms(valid_dicom).map(b64),
        "not base64": st.text(max_size=40),
    }
    good = st.lists(st.sampled_from([b64(data) for data in valid_files]), max_size=3)
    tables = {kind: st.builds(_insert, good, bad, st.integers(0, 3)).map(images_payload) for kind, bad in bad_images.items()}
    shapes = {"wrong shapes": wrong_shapes(), "paths": path_rows(), **tables}
    return {"bad JSON": bad_json(valid_files), **{kind: shape.map(_json) for kind, shape in shapes.items()}}


def bad_json(valid_files: Sequence[bytes]) -> st.SearchStrategy[bytes]:
    """Random bytes or text that is not a JSON object, or a valid request cut short."""
    valid = _json(images_payload([b64(valid_files[0])]))
    return st.one_of(
        st.binary(max_size=200).filter(lambda data: not _is_json_object(data)),
        st.text(max_size=60).map(str.encode).filter(lambda data: not _is_json_object(data)),
        st.integers(0, len(valid) - 1).map(lambda n: valid[:n]),
    )


def _json_values() -> st.SearchStrategy:
    scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats() | st.text(max_size=12)
    return st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
        max_leaves=8,
    )


def wrong_shapes() -> st.SearchStrategy[dict]:
    """Any JSON under MLflow's input keys, non-string cells, unknown columns, bad params (with an
    image cell that is not an image either, so no draw is valid)."""
    keys = st.sampled_from(["inputs", "instances", "dataframe_split", "dataframe_records"])
    not_a_string = _json_values().filter(lambda value: not isinstance(value, str))
    not_a_scalar = st.lists(_json_values(), max_size=2) | st.dictionaries(st.text(max_size=4), _json_values(), max_size=2)
    not_an_image = "aGVsbG8="  # base64 of b"hello"
    return st.one_of(
        st.builds(lambda key, value: {key: value}, keys, _json_values()),
        st.builds(lambda value, column: images_payload([value], column), not_a_string, st.sampled_from([IMAGE_COLUMN, PATH_COLUMN])),
        st.text(max_size=10).filter(lambda c: c not in (IMAGE_COLUMN, PATH_COLUMN)).map(lambda c: images_payload([not_an_image], c)),
        st.builds(lambda name, value: images_payload([not_an_image], **{name: value}),
                  st.sampled_from(["heatmap", "threshold", "specificity"]), not_a_scalar),
        st.floats(allow_nan=False).filter(lambda v: not 0.0 <= v <= 1.0).map(lambda v: images_payload([not_an_image], specificity=v)),
    )


def path_rows() -> st.SearchStrategy[dict]:
    """`path` rows: server files, escapes and any text."""
    paths = st.one_of(st.sampled_from(["/etc/passwd", "../../../../etc/passwd", "images/img0.png", "/proc/self/environ"]),
                      st.text(min_size=1, max_size=30))
    return st.lists(paths, min_size=1, max_size=3).map(lambda cells: images_payload(cells, PATH_COLUMN))


def _truncated(valid_files: Sequence[bytes]) -> st.SearchStrategy[bytes]:
    """A valid file cut short by at least 20 bytes (a PNG that only lacks IEND still decodes)."""
    return st.sampled_from(list(valid_files)).flatmap(lambda data: st.integers(0, len(data) - 20).map(lambda n: data[:n]))


def dicoms_missing_an_attribute(valid_dicom: bytes) -> st.SearchStrategy[bytes]:
    keywords = ["PixelData", "Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "PhotometricInterpretation"]
    return st.sampled_from(keywords).map(lambda keyword: _mutated(valid_dicom, lambda ds: delattr(ds, keyword)))


def odd_dicoms(valid_dicom: bytes) -> st.SearchStrategy[bytes]:
    """The valid DICOM file with one pixel-module attribute given an impossible value."""
    template = pydicom.dcmread(io.BytesIO(valid_dicom))
    rows, columns = int(template.Rows), int(template.Columns)
    photometric = st.text(alphabet=string.ascii_uppercase + " _", min_size=1, max_size=12).filter(
        lambda text: text.strip() and not PHOTOMETRIC_TERMS.intersection(text.replace("_", " ").split()))
    size = len(DICOM_PLACEHOLDER) + 1
    non_numeric = st.text(alphabet="abcxyz.+-eE ", min_size=size, max_size=size).filter(str.strip)
    return st.one_of(
        st.integers(0, 65535).filter(lambda r: r == 0 or r > rows).map(lambda r: _mutated(valid_dicom, _setter("Rows", r))),
        st.integers(0, 65535).filter(lambda c: c == 0 or c > columns).map(lambda c: _mutated(valid_dicom, _setter("Columns", c))),
        st.integers(0, 65535).filter(lambda b: b != template.BitsAllocated).map(lambda b: _mutated(valid_dicom, _setter("BitsAllocated", b))),
        st.integers(0, 65535).filter(lambda s: s != 1).map(lambda s: _mutated(valid_dicom, _setter("SamplesPerPixel", s))),
        st.integers(2, 2**31 - 1).map(lambda n: _mutated(valid_dicom, _setter("NumberOfFrames", n))),
        st.integers(-1000, 0).map(lambda w: _mutated(valid_dicom, _setters(WindowCenter=100, WindowWidth=w))),
        photometric.map(lambda text: _mutated(valid_dicom, _setter("PhotometricInterpretation", text))),
        st.builds(_non_numeric_ds, st.just(valid_dicom), st.sampled_from(
            [("WindowCenter", "WindowWidth"), ("WindowWidth", "WindowCenter"), ("RescaleSlope", "RescaleIntercept"),
             ("RescaleIntercept", "RescaleSlope")]), non_numeric),
    )


def odd_npys() -> st.SearchStrategy[bytes]:
    """NPY files that hold no image: not real numbers, no pixels or the wrong rank, or NaN/inf."""
    odd_dtypes = st.sampled_from(["<U3", "S2", "complex64", "datetime64[s]", "timedelta64[ms]", [("a", "<f4"), ("b", "u1")]])
    odd_shapes = st.one_of(
        st.lists(st.integers(0, 4), min_size=2, max_size=3).filter(lambda shape: 0 in shape),
        st.lists(st.integers(1, 3), min_size=0, max_size=1),
        st.lists(st.integers(1, 3), min_size=4, max_size=5),
        st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(0, 6).filter(lambda c: c not in (1, 3))).map(list),
    )
    return st.one_of(
        odd_dtypes.map(lambda dtype: np.zeros((4, 4), dtype=dtype)),
        odd_shapes.map(lambda shape: np.zeros(shape, dtype=np.uint8)),
        st.sampled_from([np.nan, np.inf, -np.inf]).map(lambda value: np.array([[0.0, value], [1.0, 2.0]])),
    ).map(_npy_bytes)


def _npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def _setter(keyword: str, value) -> Callable[[pydicom.Dataset], None]:
    return lambda ds: setattr(ds, keyword, value)


def _setters(**values) -> Callable[[pydicom.Dataset], None]:
    return lambda ds: [setattr(ds, keyword, value) for keyword, value in values.items()]


def _non_numeric_ds(valid_dicom: bytes, pair: tuple[str, str], text: str) -> bytes:
    """`pair[0]` holds a non-numeric text (pydicom refuses to write one, so it is swapped in after),
    `pair[1]` a valid number: both are present, so the decoder must use the bad one."""
    broken, partner = pair
    data = _mutated(valid_dicom, _setters(**{broken: DICOM_PLACEHOLDER, partner: 1}))
    placeholder = (DICOM_PLACEHOLDER + " ").encode()
    if data.count(placeholder) != 1:
        raise AssertionError(f"the placeholder {DICOM_PLACEHOLDER!r} is not unique in the DICOM template")
    return data.replace(placeholder, text.encode())


def _mutated(valid_dicom: bytes, mutate: Callable[[pydicom.Dataset], object]) -> bytes:
    dataset = pydicom.dcmread(io.BytesIO(valid_dicom))
    mutate(dataset)
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=False)
    return out.getvalue()


def _insert(cells: list, cell: str, position: int) -> list:
    return [*cells[:position], cell, *cells[position:]]


def _json(payload: dict) -> bytes:
    return json.dumps(payload).encode()


def _is_json_object(data: bytes) -> bool:
    try:
        return isinstance(json.loads(data), dict)
    except (ValueError, RecursionError):
        return False

