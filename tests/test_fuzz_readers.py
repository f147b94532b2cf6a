"""Fuzzing the two readers a site's inputs reach first: whatever the bytes, only our errors come out.

A NIfTI file with random header fields, overwritten bytes or a cut-off tail gives a usable case or a
CaseError with a message, never another exception; a partition CSV of random text gives a Partition
or a PartitionError (a ValueError) with a message.
"""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fedbrats.shared.constants import LAYOUTS
from fedbrats.shared.data.cases import find_case
from fedbrats.shared.data.partition import PartitionError, read_partition
from fedbrats.shared.data.problems import CaseError
from fedbrats.shared.data.volumes import inspect_case, load_case
from tests.data_fixtures import AFFINE, case_id_for, synthetic_arrays, write_case

FUZZ_SHAPE = (6, 6, 5)
MAX_VOXELS = 100_000  # keeps every example small, whatever shape the header claims
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _valid_nifti(data: np.ndarray) -> bytes:
    """The uncompressed .nii bytes `write_case` would write for `data`."""
    img = nib.Nifti1Image(data, AFFINE)
    img.header.set_zooms((1.0, 1.0, 1.0))
    return img.to_bytes()


@pytest.fixture(scope="module")
def fuzz_case(tmp_path_factory):
    """A valid tiny case whose t1 or seg each example replaces."""
    root = tmp_path_factory.mktemp("fuzz")
    folder = write_case(root, shape=FUZZ_SHAPE)
    images, seg = synthetic_arrays(FUZZ_SHAPE)
    lay = LAYOUTS["brats2021"]
    return {
        "case": find_case(folder),
        "files": {m: folder / lay.filename(case_id_for(1), m) for m in ("t1", "seg")},
        "valid": {"t1": _valid_nifti(images["t1"]), "seg": _valid_nifti(seg)},
    }


_INT16 = st.integers(-(2**15), 2**15 - 1)
_FLOAT = st.floats(allow_nan=True, allow_infinity=True, width=32)
_FIELDS = {
    "sizeof_hdr": st.sampled_from([348, 540, 0, -1, 2**31 - 1]),
    "dim": st.tuples(st.integers(-1, 8), *[st.integers(-2, 70) | _INT16] * 7).map(list),
    "datatype": st.one_of(st.sampled_from([2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304]), _INT16),
    "bitpix": _INT16,
    "vox_offset": st.one_of(st.sampled_from([0.0, 352.0, 353.0, 1e12]), _FLOAT),
    "scl_slope": _FLOAT,
    "scl_inter": _FLOAT,
    "pixdim": st.lists(_FLOAT, min_size=8, max_size=8),
    "qform_code": _INT16,
    "sform_code": _INT16,
    "quatern_b": _FLOAT,
    "srow_x": st.lists(_FLOAT, min_size=4, max_size=4),
    "magic": st.sampled_from([b"n+1\0", b"ni1\0", b"n+2\0", b"xxxx"]),
}


@st.composite
def mutated_nifti(draw):
    target = draw(st.sampled_from(["t1", "seg"]))
    chosen = draw(st.lists(st.sampled_from(sorted(_FIELDS)), max_size=4, unique=True))
    fields = {name: draw(_FIELDS[name]) for name in chosen}
    flips = draw(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4))
    cut = draw(st.none() | st.integers(0, 1200))
    compress = draw(st.booleans())
    return target, fields, flips, cut, compress


def _apply(valid: bytes, fields, flips, cut, compress) -> bytes:
    header = np.frombuffer(valid[:348], dtype=nib.nifti1.header_dtype).copy()
    for name, value in fields.items():
        header[name] = value
    raw = bytearray(header.tobytes() + valid[348:])
    for position, value in flips:
        if position < len(raw):
            raw[position] = value
    raw = bytes(raw[:cut] if cut is not None else raw)
    return gzip.compress(raw, compresslevel=1) if compress else raw


@FUZZ
@given(mutated_nifti())
def test_nifti_reader_gives_a_case_or_a_case_error(fuzz_case, mutation):
    target, fields, flips, cut, compress = mutation
    path = fuzz_case["files"][target]
    path.write_bytes(_apply(fuzz_case["valid"][target], fields, flips, cut, compress))
    case = fuzz_case["case"]
    _, problems = inspect_case(case, keep=False, max_voxels=MAX_VOXELS)  # never raises
    assert all(str(p) and p.problem for p in problems)
    try:
        volume = load_case(case, max_voxels=MAX_VOXELS)
    except CaseError as error:
        assert str(error) and error.problems
        event("case refused")
    else:
        assert volume.image.shape[0] == 4 and volume.image.dtype == np.float32
        event("case loaded")


@FUZZ
@given(st.text(max_size=400))
def test_partition_reader_on_random_text(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("csv") / "partitioning_1.csv"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _read_or_refuse(path)


_CELL = st.one_of(
    st.sampled_from(["1", "2", "hospital-A", "../../x", "train", "val", "Val", "", " ", '"', "a,b"]),
    st.text(alphabet="abcdefgh0123", min_size=1, max_size=8),  # mostly distinct subject ids
    st.text(alphabet=st.characters(codec="utf-8"), max_size=12),
)


@FUZZ
@given(
    st.sampled_from(["Partition_ID,Subject_ID", "Partition_ID,Subject_ID,TrainOrVal", "subject_id,partition_id", "x"]),
    st.lists(st.lists(_CELL, max_size=4), max_size=12),
    st.sampled_from(["\n", "\r\n", "\r"]),
)
def test_partition_reader_on_random_rows(tmp_path_factory, header, rows, newline):
    path = tmp_path_factory.mktemp("csv") / "partitioning_1.csv"
    lines = [header, *(",".join(row) for row in rows)]
    path.write_bytes(newline.join(lines).encode("utf-8", errors="surrogatepass"))
    _read_or_refuse(path)


@FUZZ
@given(st.binary(max_size=300))
def test_partition_reader_on_random_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("csv") / "partitioning_1.csv"
    path.write_bytes(data)
    _read_or_refuse(path)


def _read_or_refuse(path) -> None:
    try:
        partition = read_partition(path)
    except PartitionError as error:
        assert str(error)
        event("refused")
    else:
        assert partition.sites and all(partition.sites.values())
        event("read")
