"""`fedbrats data prepare`: a site's scanner exports to BraTS cases, and the table of what happened.

The work lives in `fedbrats.shared.data.prepare`; this module resolves the options (rules file,
atlas, settings), runs the batch and prints one row per patient. `--list` shows how the rules
match each patient's series without converting anything, which is how a site writes its rules.
The exit status is 1 when any case failed (the others are still prepared), 0 otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_prepare_parser(data_sub: argparse._SubParsersAction) -> None:
    p = data_sub.add_parser(
        "prepare",
        help="scanner DICOM (or four NIfTI files) per patient -> co-registered, skull-stripped BraTS cases",
    )
    p.add_argument("source", type=Path, help="folder holding one folder per patient (DICOM files anywhere below it, "
                   "or four .nii.gz files)")  # fmt: skip
    p.add_argument(
        "--out", type=Path, default=None, help="data root to write the cases to (required unless --list)"
    )
    p.add_argument(
        "--rules",
        type=Path,
        default=None,
        help="JSON or TOML file overriding the series-matching rules (docs/prepare.md)",
    )
    p.add_argument(
        "--atlas",
        type=Path,
        default=None,
        help="atlas T1 NIfTI (default: nilearn's MNI152 2009 on the BraTS grid); its grid is the output grid",
    )
    p.add_argument("--atlas-mask", type=Path, default=None, help="brain mask NIfTI of --atlas, on its grid")
    p.add_argument(
        "--voxel-size",
        type=float,
        default=1.0,
        help="mm, default atlas only: 1 = BraTS size 240x240x155; 2-3 for quick demos",
    )
    p.add_argument(
        "--layout", choices=["brats2021", "brats2023"], default="brats2021", help="file naming of the cases"
    )
    p.add_argument(
        "--mask-fit",
        choices=["rigid", "affine"],
        default="affine",
        help="brain mask fitted in size by an affine registration (default), or carried rigidly; the images "
        "are aligned rigidly either way",
    )
    p.add_argument(
        "--id-prefix",
        default=None,
        help="name cases PREFIX_<hash of the folder name> instead of the folder name (no patient names)",
    )
    p.add_argument(
        "--force", action="store_true", help="prepare again cases already prepared with the same settings"
    )
    p.add_argument(
        "--list", action="store_true", help="only show each patient's series and the modality they match"
    )
    p.add_argument("--check", action="store_true", help="run `data check` on the output afterwards")
    p.set_defaults(func=data_prepare)


def _atlas(args: argparse.Namespace):
    from fedbrats.shared.data.prepare import atlas_from_files, mni152_atlas

    if (args.atlas is None) != (args.atlas_mask is None):
        raise ValueError(
            "--atlas and --atlas-mask go together: an atlas image and its brain mask on one grid"
        )
    if args.atlas is not None:
        return atlas_from_files(args.atlas, args.atlas_mask)
    if not 0.5 <= args.voxel_size <= 6.0:
        raise ValueError(f"--voxel-size must be between 0.5 and 6 mm, got {args.voxel_size}")
    return mni152_atlas(args.voxel_size)


def _list(args: argparse.Namespace, rules, console) -> int:
    """One table per patient: each series, its slices and what the rules make of it; 1 if any patient fails."""
    from rich.table import Table

    from fedbrats.shared.data.prepare import PrepareError, find_series, match_series
    from fedbrats.shared.data.prepare.batch import patient_folders
    from fedbrats.shared.data.prepare.series import fate

    status = 0
    for folder in patient_folders(args.source):
        table = Table(title=folder.name, title_justify="left")
        for name in ("input", "slices", "rules say"):
            table.add_column(name, overflow="fold")
        try:
            series = find_series(folder)
            for s in series:
                table.add_row(s.label, str(s.n_slices or ""), fate(s, rules))
            match_series(series, rules, folder.name)
            table.caption = "[green]four modalities matched[/green]"
        except PrepareError as error:
            table.caption = f"[red]{error}[/red]"
            status = 1
        console.print(table)
    return status


def data_prepare(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fedbrats.shared.data.prepare import PrepareSettings, load_rules, prepare_batch

    console = Console()
    rules = load_rules(args.rules)
    if args.list:
        return _list(args, rules, console)
    if args.out is None:
        raise ValueError("--out is required: the data root to write the prepared cases to")
    atlas = _atlas(args)
    settings = PrepareSettings(layout=args.layout, mask_fit=args.mask_fit)
    report = prepare_batch(
        args.source, args.out, atlas, rules, settings, id_prefix=args.id_prefix, force=args.force
    )
    table = Table(title=f"data prepare -> {args.out} (atlas: {atlas.name})", title_justify="left")
    for name in ("case", "status", "seconds", "error"):
        table.add_column(name, overflow="fold")
    colours = {"prepared": "green", "skipped": "cyan", "failed": "red"}
    for o in report.outcomes:
        table.add_row(o.case_id, f"[{colours[o.status]}]{o.status}[/]", f"{o.seconds:.1f}", o.error)
    console.print(table)
    counts = {s: sum(o.status == s for o in report.outcomes) for s in colours}
    console.print(
        f"{counts['prepared']} prepared, {counts['skipped']} already prepared, {counts['failed']} failed; "
        f"provenance: {args.out}/<case>.provenance.json, batch report: {args.out}/prepare_report.json",
        highlight=False,
    )
    status = 0 if report.ok else 1
    if args.check:
        from fedbrats.check_output import run_check

        status = max(status, run_check(Path(args.out)))
    return status
