"""The phantom: a BraTS-like multi-site dataset generated from the MNI152 template (DESIGN section 3).

No data may be downloaded, so the default federation runs on these cases. Anatomy, tumor,
scanner and site are separate modules; `generate_phantom` writes the dataset, `save_montage`
draws a picture of some cases.
"""

from fedbrats.shared.data.phantom.generate import PhantomCase, generate_phantom, make_case
from fedbrats.shared.data.phantom.montage import save_montage
from fedbrats.shared.data.phantom.sites import (
    GENERATOR_VERSION,
    ModalityScanner,
    SiteProfile,
    draw_site_profiles,
    load_site_profiles,
)

__all__ = [
    "GENERATOR_VERSION",
    "ModalityScanner",
    "PhantomCase",
    "SiteProfile",
    "draw_site_profiles",
    "generate_phantom",
    "load_site_profiles",
    "make_case",
    "save_montage",
]
