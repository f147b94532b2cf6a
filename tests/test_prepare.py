"""`fedbrats data prepare`: series matching, DICOM reading, the batch, the CLI, and the phantom's geometry recovered.

No real scan is needed: `dicom_fixtures` writes DICOM series of a tiny synthetic head (fast tests) or of a
phantom case (the accuracy tests, marked slow), moved by known rigid transforms, inside a skull-like shell.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy import ndimage

from fedbrats.cli import main
from fedbrats.shared.constants import MODALITIES
from fedbrats.shared.data.check import check_root
from fedbrats.shared.data.prepare import (
    PIPELINE_VERSION,
    PrepareError,
    PrepareSettings,
    SeriesRules,
    find_series,
    load_rules,
    match_series,
    prepare_batch,
    prepare_case,
)
from fedbrats.shared.data.prepare.convert import read_volume
from fedbrats.shared.data.prepare.geometry import affine_of, array_of, image_from_array
from fedbrats.shared.data.prepare.register import displacement_mm
from fedbrats.shared.data.prepare.rules import modalities_of
from fedbrats.shared.data.prepare.series import Series
from tests.dicom_fixtures import (
    PATIENT_ID,
    PATIENT_NAME,
    brain_of,
    dice,
    head,
    phantom_atlas,
    phantom_case,
    scanner_grid,
    tiny_case,
    write_patient,
    write_series,
)

DESCRIPTIONS = [
    ("T1 MPRAGE", "t1"), ("t1_mprage_sag", "t1"), ("T1W_3D_TFE", "t1"), ("BraTS-GLI-00001-000-t1n", "t1"),
    ("AX T1 POST GAD", "t1ce"), ("t1_mprage_tra_Gd", "t1ce"), ("T1 +C", "t1ce"), ("T1-CE", "t1ce"),
    ("Case_7_t1ce", "t1ce"), ("T1KM", "t1ce"), ("AX T2 FSE", "t2"), ("t2_tse_tra", "t2"), ("x-t2w", "t2"),
    ("AX FLAIR", "flair"), ("t2_tirm_tra_dark-fluid", "flair"), ("T2W_FLAIR", "flair"), ("x-t2f", "flair"),
    ("localizer", None), ("T2* GRE", None), ("AX DWI", None), ("ADC", None), ("T1 POST MPR COR", None),
    ("SWI", None),
]  # fmt: skip


@pytest.mark.parametrize(("description", "modality"), DESCRIPTIONS)
def test_default_rules_match_scanner_descriptions(description: str, modality: str | None) -> None:
    expected = [modality] if modality else []
    assert modalities_of({"SeriesDescription": description}, SeriesRules()) == expected


def _series(description: str, number: int, slices: int = 40, voxels: int = 1000, problem: str = "") -> Series:
    fields = {"SeriesDescription": description, "SeriesNumber": str(number)}
    return Series(f"1.2.{number}", "dicom", fields, (Path(f"s{number}"),) * slices, slices, voxels, problem)


def test_rules_file_overrides_only_what_it_names(tmp_path: Path) -> None:
    site = [
        _series("MPRAGE before", 2),
        _series("MPRAGE after", 3),
        _series("t2_tse", 4),
        _series("flair", 5),
    ]
    with pytest.raises(PrepareError, match="no series matches t1"):
        match_series(site, SeriesRules())
    toml = tmp_path / "rules.toml"
    toml.write_text('[t1]\ninclude = ["before"]\n[t1ce]\ninclude = ["after"]\nexclude = []\n')
    chosen = match_series(site, load_rules(toml))
    assert {m: s.fields["SeriesNumber"] for m, s in chosen.items()} == {
        "t1": "2",
        "t1ce": "3",
        "t2": "4",
        "flair": "5",
    }
    rules = load_rules(toml)
    assert rules.modalities["t2"] == SeriesRules().modalities["t2"]  # untouched modalities keep the defaults
    as_json = tmp_path / "rules.json"
    as_json.write_text(
        json.dumps({"t1": {"include": ["before"]}, "t1ce": {"include": ["after"]}, "min_slices": 3})
    )
    assert load_rules(as_json).min_slices == 3
    assert match_series(site, load_rules(as_json))["t1ce"].fields["SeriesNumber"] == "3"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[t1c]\ninclude = ["x"]\n', "unknown key"),
        ('[t1]\ninclude = ["(unclosed"]\n', "not a valid regular expression"),
        ('choose = "newest"\n', "choose must be one of"),
        ("min_slices = 0\n", "min_slices"),
        ("fields = [", "cannot parse"),
    ],
)
def test_bad_rules_files_are_named_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "site_rules.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        load_rules(path)
    assert "site_rules.toml" in str(info.value)


def test_missing_and_ambiguous_series_are_errors_naming_them() -> None:
    base = [
        _series("T1", 2),
        _series("T1 POST", 3),
        _series("T2", 4),
        _series("3-plane localizer", 1, slices=3),
    ]
    with pytest.raises(PrepareError, match="no series matches flair") as info:
        match_series(base, SeriesRules(), "P7")
    assert "P7:" in str(info.value) and "series 1 '3-plane localizer'" in str(info.value)
    twice = [*base, _series("FLAIR", 5, voxels=500), _series("FLAIR 3D", 6, voxels=9000)]
    with pytest.raises(PrepareError, match="2 series match flair") as info:
        match_series(twice, SeriesRules())
    assert "series 5 'FLAIR'" in str(info.value) and "series 6 'FLAIR 3D'" in str(info.value)
    chosen = match_series(twice, SeriesRules(choose="most-voxels"))
    assert chosen["flair"].fields["SeriesNumber"] == "6"
    broken = [*base, _series("FLAIR", 5, problem="3 slice position(s) repeated")]
    with pytest.raises(PrepareError, match="not a volume: 3 slice position"):
        match_series(broken, SeriesRules())


def _oblique_volume(rng: np.random.Generator) -> sitk.Image:
    grid = scanner_grid((10.0, -20.0, 30.0), (1.5, 2.0, 3.0), (12, 10, 9), tilt_degrees=17.0)
    data = rng.integers(-100, 3000, size=(9, 10, 12)).astype(np.int16)
    image = sitk.GetImageFromArray(data)
    image.CopyInformation(grid)
    return image


def test_dicom_series_read_back_with_its_geometry(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = _oblique_volume(rng)
    uid = write_series(tmp_path / "P1" / "deep" / "S7", image, "AX T1 POST", 7, "1.2.3", rng)
    (tmp_path / "P1" / "notes.txt").write_text("not DICOM")
    (tmp_path / "P1" / ".DS_Store").write_bytes(b"\0\1")
    series = find_series(tmp_path / "P1")
    assert [s.uid for s in series] == [uid] and series[0].n_slices == 9 and not series[0].problem
    assert PATIENT_NAME not in json.dumps(series[0].fields) and PATIENT_ID not in json.dumps(series[0].fields)
    volume = read_volume(series[0])
    assert volume.integer
    np.testing.assert_array_equal(sitk.GetArrayFromImage(volume.image), sitk.GetArrayFromImage(image))
    np.testing.assert_allclose(volume.image.GetSpacing(), image.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(volume.image.GetOrigin(), image.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(volume.image.GetDirection(), image.GetDirection(), atol=1e-5)
    affine = affine_of(volume.image)  # RAS <-> LPS round trip
    np.testing.assert_allclose(affine_of(image_from_array(array_of(volume.image), affine)), affine, atol=1e-6)


def test_gapped_or_repeated_slices_are_not_a_volume(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    write_series(tmp_path / "P1", _oblique_volume(rng), "AX FLAIR", 5, "1.2.3", rng)
    files = sorted((tmp_path / "P1").iterdir())
    middle = next(f for f in files if pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber == 5)
    middle.unlink()
    (gapped,) = find_series(tmp_path / "P1")
    assert "uneven slice spacing" in gapped.problem
    with pytest.raises(PrepareError, match="uneven slice spacing"):
        read_volume(gapped)
    shutil.copy(next(f for f in files if f != middle), tmp_path / "P1" / "copy")
    (repeated,) = find_series(tmp_path / "P1")
    assert "repeated" in repeated.problem


def _all_bytes(folder: Path) -> bytes:
    import gzip

    found = b""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            found += gzip.decompress(data) if path.name.endswith(".gz") else data
    return found


def test_batch_reports_a_broken_case_and_goes_on(tmp_path: Path) -> None:
    case = tiny_case()
    atlas = phantom_atlas(case)
    source, out = tmp_path / "source", tmp_path / "out"
    good = write_patient(source / "P_good", case, seed=1)
    write_patient(source / "P_noflair", case, seed=2, modalities=("t1", "t1ce", "t2"))
    (source / "P_junk").mkdir()
    (source / "P_junk" / "readme.txt").write_text("no images here")
    report = prepare_batch(source, out, atlas, progress=False)
    status = {o.source: (o.status, o.error) for o in report.outcomes}
    assert status["P_good"] == ("prepared", "")
    assert status["P_noflair"][0] == "failed" and "no series matches flair" in status["P_noflair"][1]
    assert "series 2 't1_mprage_sag'" in status["P_noflair"][1]  # the hint lists what was found
    assert status["P_junk"][0] == "failed" and "no DICOM image series" in status["P_junk"][1]
    assert not report.ok and [o.source for o in report.failed] == ["P_junk", "P_noflair"]
    assert not (out / "P_noflair").exists() and not any(p.name.startswith(".prepare") for p in out.iterdir())

    checked = check_root(out)
    assert checked.ok and [c.case_id for c in checked.usable] == ["P_good"]
    near_brain = ndimage.binary_dilation(array_of(atlas.mask), iterations=3)
    for modality in MODALITIES:
        image = nib.load(out / "P_good" / f"P_good_{modality}.nii.gz")
        assert image.shape == atlas.shape and image.get_data_dtype() == np.int16
        np.testing.assert_allclose(image.affine, affine_of(atlas.image), atol=1e-5)
        data = np.asarray(image.dataobj)
        assert data[~near_brain].max() == 0 and data.max() > 0  # skull-stripped: the shell is gone
        assert abs((data > 0).sum() / array_of(atlas.mask).sum() - 1) < 0.15
    record = json.loads((out / "P_good.provenance.json").read_text())
    assert record["pipeline_version"] == PIPELINE_VERSION and record["atlas"]["sha256"] == atlas.digest
    assert {m: record["inputs"][m]["series_uid"] for m in MODALITIES} == good.series_uids
    assert set(record["transforms"]) == {"t1ce_to_atlas", "t1_to_t1ce", "t2_to_t1ce", "flair_to_t1ce"}
    written = _all_bytes(out)
    assert PATIENT_NAME.encode() not in written and PATIENT_ID.encode() not in written
    batch = json.loads((out / "prepare_report.json").read_text())
    assert (batch["prepared"], batch["failed"]) == (1, 2)

    again = prepare_batch(source, out, atlas, progress=False)
    assert {o.source: o.status for o in again.outcomes}["P_good"] == "skipped"


def _write_nifti_patient(folder: Path, case, names: dict[str, str], seed: int) -> None:
    """Four NIfTI files as a site might export them: its own grid (shifted, tilted), its own names."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    grid = scanner_grid((3.0, -4.0, 5.0), (4.0, 4.0, 4.0), (50, 56, 46), tilt_degrees=8.0)
    for modality, name in names.items():
        source = image_from_array(head(case, modality, rng), case.affine)
        native = sitk.Resample(source, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkInt16)
        sitk.WriteImage(native, str(folder / name))


def test_cli_prepares_nifti_input_with_pseudonymous_ids(tmp_path: Path, capsys) -> None:
    case = tiny_case()
    atlas = phantom_atlas(case)
    sitk.WriteImage(atlas.image, str(tmp_path / "atlas.nii.gz"))
    sitk.WriteImage(atlas.mask, str(tmp_path / "atlas_mask.nii.gz"))
    source, out = tmp_path / "source", tmp_path / "out"
    names = {
        "t1": "anon_T1.nii.gz",
        "t1ce": "anon_T1CE.nii.gz",
        "t2": "anon_T2.nii.gz",
        "flair": "anon_FLAIR.nii.gz",
    }
    _write_nifti_patient(source / "Smith John", case, names, seed=3)
    _write_nifti_patient(source / "Two files", case, {m: names[m] for m in ("t1", "t2")}, seed=4)
    assert main(["data", "prepare", str(source), "--list"]) == 1
    listed = capsys.readouterr().out
    assert "four modalities matched" in listed and "no series matches t1ce" in listed
    args = ["data", "prepare", str(source), "--out", str(out), "--atlas", str(tmp_path / "atlas.nii.gz"),
            "--atlas-mask", str(tmp_path / "atlas_mask.nii.gz"), "--id-prefix", "SITE3", "--layout", "brats2023", "--check"]  # fmt: skip
    assert main(args) == 1  # one patient failed: reported, not fatal to the other
    printed = capsys.readouterr().out
    assert "prepared" in printed and "failed" in printed and "1 cases, all usable" in printed  # --check
    (case_dir,) = [p for p in out.iterdir() if p.is_dir()]
    assert case_dir.name.startswith("SITE3_") and "Smith" not in case_dir.name
    assert sorted(p.name for p in case_dir.iterdir()) == sorted(f"{case_dir.name}-{s}.nii.gz" for s in
                                                                ("t1n", "t1c", "t2w", "t2f"))  # fmt: skip
    record = json.loads((out / f"{case_dir.name}.provenance.json").read_text())
    assert record["inputs"]["t1ce"]["series_uid"].startswith("sha256:") and "Smith" not in json.dumps(record)
    assert check_root(out).ok
    assert (
        main(["data", "prepare", str(source), "--out", str(out), "--atlas", str(tmp_path / "atlas.nii.gz")])
        == 2
    )
    assert "--atlas and --atlas-mask go together" in capsys.readouterr().err


# ---- the phantom: geometry recovered (the acceptance test) ----


@pytest.fixture(scope="module")
def phantom_scan(tmp_path_factory):
    """A 3 mm phantom case written as four DICOM series (head moved up to 12 deg / 15 mm), then prepared."""
    case = phantom_case(3.0)
    atlas = phantom_atlas(case)
    root = tmp_path_factory.mktemp("phantom_dicom")
    scan = write_patient(root / "source" / "Phantom_P1", case, seed=7)
    prepared = prepare_case(scan.folder, root / "out", "Phantom_P1", atlas)
    return case, atlas, scan, prepared, root / "out"


@pytest.mark.slow
def test_prepare_recovers_the_phantom_geometry(phantom_scan) -> None:
    case, atlas, scan, prepared, out = phantom_scan
    for (
        modality
    ) in MODALITIES:  # registration error: mean displacement of the brain voxels, recovered vs true
        error = displacement_mm(atlas.mask, prepared.to_atlas[modality], scan.to_scanner[modality])
        assert error.mean() < 2.0, (modality, float(error.mean()))
    assert dice(array_of(prepared.native_mask), array_of(scan.native_brain)) >= 0.95  # in the scanner's grid
    assert dice(array_of(prepared.output_mask), brain_of(case)) >= 0.95  # the affine-fitted mask, output grid
    # where the true brain lands in the output, against the untransformed phantom's brain
    landed = sitk.Resample(
        scan.native_brain, atlas.image, prepared.to_atlas["t1ce"], sitk.sitkNearestNeighbor, 0
    )
    assert dice(array_of(landed), brain_of(case)) >= 0.95
    t1ce = np.asarray(nib.load(out / "Phantom_P1" / "Phantom_P1_t1ce.nii.gz").dataobj, dtype=np.float32)
    inside = brain_of(case)
    assert np.corrcoef(t1ce[inside], case.images["t1ce"][inside])[0, 1] > 0.9
    assert check_root(out).ok


@pytest.mark.slow
def test_rigid_mask_keeps_the_phantom_brain(phantom_scan, tmp_path: Path) -> None:
    case, atlas, scan, _, _ = phantom_scan
    fitted = prepare_case(scan.folder, tmp_path, "P", atlas, settings=PrepareSettings(mask_fit="rigid"))
    assert dice(array_of(fitted.native_mask), array_of(scan.native_brain)) >= 0.95
    assert dice(array_of(fitted.output_mask), brain_of(case)) >= 0.95


@pytest.mark.slow
def test_default_atlas_is_nilearns_mni152_on_the_brats_grid() -> None:
    from fedbrats.shared.data.prepare import mni152_atlas

    atlas = mni152_atlas(1.0)
    assert atlas.shape == (240, 240, 155) and atlas.voxel_size == (1.0, 1.0, 1.0)
    assert 1.5e6 < array_of(atlas.mask).sum() < 1.9e6  # nilearn's MNI152 brain: 1.88 M voxels of 1 mm
    assert mni152_atlas(3.0).shape == (80, 80, 52)
