"""A site's inputs cannot exhaust it: NIfTI headers and streams are capped, site ids cannot be paths."""

from __future__ import annotations

import gzip
import zlib

import nibabel as nib
import numpy as np
import pytest

from fedbrats.client.site import _site_name
from fedbrats.shared.data.cases import find_case
from fedbrats.shared.data.dataset import PatientDataset
from fedbrats.shared.data.nifti import MAX_HEADER_BYTES, MAX_VOXELS, NiftiLimitError, open_nifti
from fedbrats.shared.data.partition import Partition, PartitionError, read_partition, safe_site_id
from fedbrats.shared.data.problems import CaseError
from fedbrats.shared.data.volumes import inspect_case, load_case
from tests.data_fixtures import SHAPE, case_id_for, write_case


def header_block(shape, dtype=np.int16, vox_offset: int = 352, extension_flag: bool = False) -> bytes:
    """A NIfTI-1 header claiming `shape` (nothing checks the claim), plus the 4-byte extension flag."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(shape)
    hdr.set_data_offset(vox_offset)
    return hdr.binaryblock + (b"\x01\0\0\0" if extension_flag else b"\0\0\0\0")


def write_bomb(path, head: bytes, zeros: int) -> None:
    """`head` then `zeros` zero bytes, gzip-compressed chunk by chunk (a 1000:1 decompression bomb)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(1 << 22)
    with open(path, "wb") as f:
        f.write(comp.compress(head))
        while zeros > 0:
            f.write(comp.compress(chunk[: min(zeros, len(chunk))]))
            zeros -= len(chunk)
        f.write(comp.flush())


def case_with_t1(tmp_path, write_t1):
    folder = write_case(tmp_path)
    t1 = folder / f"{case_id_for(1)}_t1.nii.gz"
    write_t1(t1)
    return find_case(folder), t1.name


def test_header_claiming_10000_cubed_is_refused_from_the_header(tmp_path):
    case, t1 = case_with_t1(tmp_path, lambda p: write_bomb(p, header_block((10000, 10000, 10000)), 1 << 20))
    with pytest.raises(CaseError) as err:
        load_case(case)
    (problem,) = [p for p in err.value.problems if p.file == t1]
    assert "header claims shape 10000x10000x10000 = 1,000,000,000,000 voxels" in problem.problem
    assert f"cap of {MAX_VOXELS:,} voxels (512^3)" in problem.problem
    assert "re-download" not in problem.problem
    assert str(problem).startswith(f"{case.case_id}/{t1}: ")


def test_gzip_bomb_under_an_honest_header_is_refused_for_its_extra_data(tmp_path):
    # the header claims a normal shape, the stream holds 64 MB of zeros after it
    case, t1 = case_with_t1(tmp_path, lambda p: write_bomb(p, header_block(SHAPE), 64 << 20))
    assert (case.folder / t1).stat().st_size < 200_000
    _, problems = inspect_case(case)
    (problem,) = [p for p in problems if p.file == t1]
    expected = 352 + int(np.prod(SHAPE)) * 2
    assert problem.fatal
    assert f"holds more data than its header accounts for ({expected:,} bytes: shape 24x24x16 of int16" in (
        problem.problem
    )


def test_header_claiming_more_than_the_stream_holds_is_a_truncated_file(tmp_path):
    case, t1 = case_with_t1(tmp_path, lambda p: write_bomb(p, header_block((64, 64, 64)), 1000))
    _, problems = inspect_case(case)
    (problem,) = [p for p in problems if p.file == t1]
    assert "cannot read" in problem.problem and "Expected 524288 bytes" in problem.problem


def test_voxel_cap_is_a_parameter(tmp_path):
    case = find_case(write_case(tmp_path))
    with pytest.raises(CaseError, match=r"24x24x16 = 9,216 voxels, over the cap of 1,000 voxels \(10\^3\)"):
        load_case(case, max_voxels=1000)
    assert load_case(case, max_voxels=int(np.prod(SHAPE))).shape == SHAPE


def test_extension_claiming_gigabytes_is_refused_without_reading_it(tmp_path):
    head = header_block(SHAPE, vox_offset=2_000_000_000, extension_flag=True)
    extension = np.array([1_999_999_008, 0], dtype="<i4").tobytes()  # esize ~2 GB, ecode 0
    case, t1 = case_with_t1(tmp_path, lambda p: write_bomb(p, head + extension, 1 << 20))
    _, problems = inspect_case(case)
    (problem,) = [p for p in problems if p.file == t1]
    assert f"header extensions run past {MAX_HEADER_BYTES:,} bytes" in problem.problem


def test_voxel_offset_past_the_header_cap_is_refused(tmp_path):
    head = header_block(SHAPE, vox_offset=MAX_HEADER_BYTES + 16)
    case, t1 = case_with_t1(tmp_path, lambda p: write_bomb(p, head, 1000))
    _, problems = inspect_case(case)
    (problem,) = [p for p in problems if p.file == t1]
    assert f"voxel data at byte {MAX_HEADER_BYTES + 16:,}, past the cap" in problem.problem


def test_header_only_dataset_check_applies_the_caps(tmp_path):
    case, t1 = case_with_t1(tmp_path, lambda p: write_bomb(p, header_block((10000, 10000, 10000)), 1000))
    dataset = PatientDataset([case], (8, 8, 8), cache=None, progress=False)
    assert len(dataset) == 0
    assert any(p.file == t1 and "header claims shape 10000x10000x10000" in p.problem for p in dataset.skipped)


def test_bounded_reader_matches_nibabel_and_sniffs_compression(tmp_path):
    data = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(0.5, 3.0)
    nib.save(img, tmp_path / "x.nii.gz")
    with open_nifti(tmp_path / "x.nii.gz") as nifti:
        scaled = nifti.read_image()
    np.testing.assert_array_equal(scaled, nib.load(tmp_path / "x.nii.gz").get_fdata(dtype=np.float32))
    # an uncompressed file under a .gz name reads too: the stream is sniffed, not named
    (tmp_path / "plain.nii.gz").write_bytes(gzip.decompress((tmp_path / "x.nii.gz").read_bytes()))
    with open_nifti(tmp_path / "plain.nii.gz") as nifti:
        np.testing.assert_array_equal(nifti.read_image(), scaled)
    # trailing bytes after the voxels of an uncompressed file are refused as well
    (tmp_path / "long.nii").write_bytes((tmp_path / "plain.nii.gz").read_bytes() + b"\0" * 64)
    with open_nifti(tmp_path / "long.nii") as nifti, pytest.raises(NiftiLimitError, match="more data than"):
        nifti.read_image()


# ------------------------------------------------------------------ site ids


@pytest.mark.parametrize("site", ["1", "17", "hospital-A_2", "site.3", "A" * 64])
def test_safe_site_ids_pass(site):
    assert safe_site_id(site, "test") == site


@pytest.mark.parametrize(
    "site", ["../../x", "..", "a..b", "a/b", "a\\b", ".hidden", "-x", "_x", "a b", "é", "A" * 65, "x\n", ""]
)
def test_unsafe_site_ids_are_refused(site):
    with pytest.raises(PartitionError, match="is not a safe site id"):
        safe_site_id(site, "test")


def test_partition_csv_with_a_path_as_site_names_file_line_and_value(tmp_path):
    csv = tmp_path / "partitioning_1.csv"
    csv.write_text("Partition_ID,Subject_ID\n1,a\n../../x,b\n")
    with pytest.raises(PartitionError) as err:
        read_partition(csv)
    assert str(err.value).startswith(f"{csv}, line 3: Partition_ID '../../x' is not a safe site id; expected")


def test_partition_built_in_code_refuses_unsafe_site_ids():
    with pytest.raises(PartitionError, match="partition site '../x' is not a safe site id"):
        Partition({"../x": ["a"]}, {})


def test_node_config_site_name_is_validated_by_the_same_rule():
    with pytest.raises(PartitionError, match="the node config's site-name '../../x' is not a safe site id"):
        _site_name({"site-name": "../../x"}, [])
    assert _site_name({"site-name": "hospital-A"}, []) == "hospital-A"


def test_partition_file_over_the_size_cap_is_refused_unread(tmp_path, monkeypatch):
    import fedbrats.shared.data.partition as partition_module

    csv = tmp_path / "partitioning_1.csv"
    csv.write_text("Partition_ID,Subject_ID\n" + "".join(f"1,case{i}\n" for i in range(100)))
    monkeypatch.setattr(partition_module, "MAX_PARTITION_BYTES", 200)
    with pytest.raises(PartitionError, match=f"{csv}: larger than 200 bytes; expected a partition CSV"):
        read_partition(csv)


def test_partition_csv_syntax_error_names_the_line(tmp_path):
    csv = tmp_path / "partitioning_1.csv"
    csv.write_text("Partition_ID,Subject_ID\n1,a\n1," + "b" * 200_000 + "\n")
    with pytest.raises(PartitionError, match=r", line 3: field larger than field limit \(131072\); expected CSV text"):
        read_partition(csv)
