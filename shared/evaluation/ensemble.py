"""Ensembles of checkpoints: one case segmented from the mean of several models' region probabilities.

The seed papers submit 5-fold ensembles (the same network trained on five splits), averaged on the
probabilities. Here any segmentation checkpoints can be members, of different networks too (the 3D
`resunet` and the 2D `resfcn2d`, say): each is rebuilt from its own metadata and predicts with its own
training patch and flip TTA; `inference.segment_case` averages the probabilities voxel by voxel, segments
the mean as it segments one model's (threshold 0.5, post-processing, TuNet uncertainty of the mean), and
writes the members' spread as well: per region, 200 x the standard deviation of their probabilities, in
[0, 100] like the uncertainty maps (two members that say 0 and 1 give 100).

A case classifier gives class probabilities, not region maps: it is not averaged with segmenters, and an
ensemble of classifiers is not offered (`fedbrats predict` scores one classifier per call).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedbrats.shared.checkpoint import CheckpointError, load_checkpoint, read_metadata
from fedbrats.shared.evaluation.inference import Predictor, segment_case, training_patch
from fedbrats.shared.evaluation.postprocess import MIN_ET_MM3


def _is_classifier(meta: dict) -> bool:
    from fedbrats.shared.evaluation.predict_class import is_case_classifier

    return is_case_classifier(meta)


def check_members(paths: Sequence[str | Path]) -> list[Path]:
    """The checkpoints of a prediction, checked from their metadata alone (no weights loaded): at least one,
    none twice, no case classifier among several. One classifier alone passes (it predicts alone)."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no checkpoint given; pass --checkpoint at least once")
    seen: set[Path] = set()
    for path in paths:
        if path.resolve() in seen:
            raise ValueError(f"checkpoint {path} is given twice; an ensemble averages distinct checkpoints")
        seen.add(path.resolve())
    if len(paths) > 1:
        classifiers = [p for p in paths if _is_classifier(read_metadata(p))]
        if classifiers and len(classifiers) < len(paths):
            raise CheckpointError(
                f"cannot mix a case classifier ({', '.join(map(str, classifiers))}) with segmentation "
                "checkpoints: an ensemble averages region probabilities; predict with the classifier alone"
            )
        if classifiers:
            raise CheckpointError(
                f"{len(classifiers)} case classifiers given: ensembles average segmentation checkpoints only; "
                "predict with one classifier at a time"
            )
    return paths


def load_members(paths: Sequence[str | Path]) -> list[Predictor]:
    """Every checkpoint rebuilt from its own metadata, after `check_members`; a case classifier or a
    checkpoint without its training patch size is an error naming the file."""
    members = []
    for path in check_members(paths):
        model, meta = load_checkpoint(path)
        if _is_classifier(meta):
            raise CheckpointError(
                f"checkpoint {path} is a case classifier (task {meta.get('task')!r}); it gives class "
                "probabilities, not a segmentation"
            )
        members.append(Predictor(model, training_patch(meta, path), f"{path} ({meta['model_name']})"))
    return members


def predict_ensemble(
    checkpoint_paths: Sequence[str | Path],
    case_dir: str | Path,
    out_dir: str | Path,
    *,
    tta: bool = True,
    device: str = "auto",
    overlap: float = 0.5,
    min_et_mm3: float = MIN_ET_MM3,
) -> dict[str, Path]:
    """Segment one case folder with the mean of the checkpoints' probabilities; the files of
    `inference.segment_case` (labels, uncertainty of the mean, spread of the members, overlay)."""
    members = load_members(checkpoint_paths)
    return segment_case(
        members, case_dir, out_dir, tta=tta, device=device, overlap=overlap, min_et_mm3=min_et_mm3
    )
