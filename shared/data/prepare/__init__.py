"""From scanner DICOM (or four NIfTI files) per patient to a BraTS case: `fedbrats data prepare`.

Series are matched to T1/T1ce/T2/FLAIR by rules a site can override (`rules`), read with SimpleITK
(`series`, `convert`), rigidly registered, every modality to the T1ce and the T1ce to an atlas
(`register`, `atlas`: nilearn's MNI152 by default), skull-stripped with the atlas brain mask carried
through the registration (`brain`), and written in the BraTS layout with a provenance JSON
(`pipeline`, `provenance`); `batch` runs a whole site, one failed patient never stopping the rest.
"""

from fedbrats.shared.data.prepare.atlas import Atlas, atlas_from_arrays, atlas_from_files, mni152_atlas
from fedbrats.shared.data.prepare.batch import BatchReport, CaseOutcome, prepare_batch
from fedbrats.shared.data.prepare.pipeline import (
    PIPELINE_VERSION,
    PreparedCase,
    PrepareSettings,
    prepare_case,
)
from fedbrats.shared.data.prepare.register import RegistrationSettings
from fedbrats.shared.data.prepare.rules import SeriesRules, load_rules
from fedbrats.shared.data.prepare.series import PrepareError, find_series, match_series

__all__ = [
    "PIPELINE_VERSION",
    "Atlas",
    "BatchReport",
    "CaseOutcome",
    "PrepareError",
    "PrepareSettings",
    "PreparedCase",
    "RegistrationSettings",
    "SeriesRules",
    "atlas_from_arrays",
    "atlas_from_files",
    "find_series",
    "load_rules",
    "match_series",
    "mni152_atlas",
    "prepare_batch",
    "prepare_case",
]
