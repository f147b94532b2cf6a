"""MONAI as a site imports it: without what a site never uses, and with what it rarely uses deferred.

In a deployment Flower starts a fresh ClientApp process for every message, so `import monai` is paid on
every message. MONAI's ``__init__`` imports every submodule, and those import, through MONAI's
``optional_import``, packages a site either never uses through MONAI (`MONAI_UNUSED`: held as placeholders
while MONAI imports) or uses only on some messages (`MONAI_DEFERRED`: stand-ins that import the real package
on first use, so nothing MONAI does with them breaks).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any

#: Packages MONAI imports when they are installed though a site never uses them through MONAI (its
#: MLflow and TensorBoard handlers, profiling with pandas, Jupyter plots, sklearn metrics, ignite):
#: with the `tracking` extra installed they were 5 of the 8 CPU seconds of `import monai`. SciPy's
#: signal processing (which loads scipy.stats) and sparse solvers serve only MONAI's ultrasound
#: confidence map and notch filter, requests and jsonschema only its downloads and bundle schemas:
#: another third of what was left (3.0 to 2.0 CPU s). pydicom serves only MONAI's DICOM reader (sites read NIfTI;
#: `fedbrats data prepare` imports pydicom itself).
MONAI_UNUSED = ("mlflow", "tensorboard", "pandas", "matplotlib", "sklearn", "ignite",
                "scipy.signal", "scipy.sparse.linalg", "requests", "jsonschema", "pydicom")  # fmt: skip

#: Packages a site uses on some messages only: nibabel reads NIfTI when the site builds its cache,
#: scipy.ndimage and scipy.spatial serve post-processing and HD95 when it evaluates. MONAI imported them
#: all (0.75 of its 1.3 CPU s on this machine); deferred, a message that does not use them does not pay.
#: scipy.sparse serves MONAI's ultrasound confidence map and, through SciPy, the KDTree of HD95; scipy.optimize
#: its panoptic quality (linear_sum_assignment).
MONAI_DEFERRED = ("scipy.ndimage", "scipy.spatial", "scipy.sparse", "scipy.optimize", "nibabel", "nibabel.nifti1")


class _DeferredAttribute:
    """``from package import name`` of a deferred package: resolved on first call, attribute or isinstance."""

    def __init__(self, module: str, name: str) -> None:
        self._module, self._name = module, name

    def _resolve(self) -> Any:
        return getattr(importlib.import_module(self._module), self._name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._resolve()(*args, **kwargs)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._resolve(), attr)

    def __instancecheck__(self, obj: Any) -> bool:
        return isinstance(obj, self._resolve())

    def __subclasscheck__(self, cls: type) -> bool:
        return issubclass(cls, self._resolve())


class _DeferredModule(types.ModuleType):
    """Stands in for a package in `sys.modules` while MONAI imports; loads the package on first real use."""

    def __init__(self, name: str, origin: str | None, path: list[str] | None) -> None:
        super().__init__(name)
        self.__file__ = origin  # MONAI's optional_import takes a module without __file__ for a namespace package
        if path is not None:
            self.__path__ = path
        self._importing = True  # while MONAI imports: `optional_import(pkg, name=...)` gets a deferred attribute

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        if self.__dict__.get("_importing"):
            return _DeferredAttribute(self.__name__, attr)
        real = importlib.import_module(self.__name__)  # the stand-in left sys.modules when MONAI was imported
        self.__dict__.update(real.__dict__)  # later reads skip this method
        return getattr(real, attr)


def _spec(name: str) -> importlib.machinery.ModuleSpec | None:
    """Where `name` would be imported from, without importing its parent package (`find_spec` of
    ``nibabel.nifti1`` imports nibabel, which is what deferring it saves)."""
    parent, _, _ = name.rpartition(".")
    if not parent or parent in sys.modules:
        return importlib.util.find_spec(name)
    parent_spec = _spec(parent)
    if parent_spec is None or parent_spec.submodule_search_locations is None:
        return None
    return importlib.machinery.PathFinder.find_spec(name, list(parent_spec.submodule_search_locations))


def _stand_in(name: str) -> _DeferredModule | None:
    try:
        spec = _spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None  # not installed: MONAI's optional_import says so, as without us
    path = list(spec.submodule_search_locations) if spec.submodule_search_locations is not None else None
    return _DeferredModule(name, spec.origin, path)


def import_monai_light() -> None:
    """Import MONAI (and monai.transforms) with `MONAI_UNUSED` blocked and `MONAI_DEFERRED` deferred.

    A site's message pays for MONAI; this takes it from about 8 to 3 CPU seconds (blocked) and further
    (deferred). Every package stays importable afterwards: code that imports one itself gets the real one."""
    if "monai" in sys.modules:
        return
    held: dict[str, Any] = dict.fromkeys(name for name in MONAI_UNUSED if name not in sys.modules)
    held |= {name: _stand_in(name) for name in MONAI_DEFERRED if name not in sys.modules}
    held = {name: module for name, module in held.items() if name in MONAI_UNUSED or module is not None}
    sys.modules.update(held)  # None: `import name` raises ImportError
    try:
        import monai  # noqa: F401
        import monai.transforms  # noqa: F401
    finally:
        for name, module in held.items():
            if sys.modules.get(name, False) is module:
                del sys.modules[name]
            if module is not None:
                module.__dict__["_importing"] = False
