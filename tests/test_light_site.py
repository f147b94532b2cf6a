"""A deployed site imports the ClientApp on every message: the import must not pull in what the message may not use.

Flower starts a fresh ClientApp process per message, so whatever `fedbrats.client.app` imports at module
level is paid on every train and evaluate message. Opacus (DP-SGD), MONAI and the data stack, SciPy and
matplotlib are imported where they are used. Module presence, not timing: `benchmarks/bench_site_import.py`
measures the seconds. Rich is imported by Flower itself (its CLI and httpx), so for rich the test asks that
our modules add nothing to what Flower and torch already import.
"""

from __future__ import annotations

import pytest

from .fresh_python import fresh_python

#: Never imported by a site's module import, whoever would bring them.
NEVER = ("opacus", "monai", "matplotlib", "scipy", "nibabel", "sklearn", "pandas")
#: Not imported by our modules beyond what Flower and torch import themselves.
NOT_OURS = (*NEVER, "rich")

PROBE = """
import json, sys
import flwr.app, flwr.clientapp, flwr.serverapp, torch
before = {{m.split(".")[0] for m in sys.modules}}
import {module}
after = {{m.split(".")[0] for m in sys.modules}}
print(json.dumps({{"present": sorted(after), "added": sorted(after - before)}}))
"""


def _imported_by(module: str, tmp_path) -> dict[str, list[str]]:
    """Top-level packages present after importing `module` in a fresh interpreter, and those it added."""
    return fresh_python(PROBE.format(module=module), tmp_path)


@pytest.mark.slow
def test_importing_the_client_app_pulls_in_no_heavy_package(tmp_path):
    found = _imported_by("fedbrats.client.app", tmp_path)
    assert not [m for m in NEVER if m in found["present"]], found["present"]
    assert not [m for m in NOT_OURS if m in found["added"]], found["added"]
    assert "fedbrats" in found["added"]  # the probe did import our module


@pytest.mark.slow
def test_importing_the_server_app_pulls_in_no_heavy_package(tmp_path):
    found = _imported_by("fedbrats.server.app", tmp_path)
    assert not [m for m in NEVER if m in found["present"]], found["present"]
    assert not [m for m in NOT_OURS if m in found["added"]], found["added"]


@pytest.mark.slow
def test_the_probe_sees_a_heavy_import(tmp_path):
    """The probe itself: a module that imports SciPy is caught."""
    found = _imported_by("scipy.stats", tmp_path)
    assert "scipy" in found["added"] and "scipy" in found["present"]


GATE_PROBE = """
import json, sys
from fedbrats.app_gate import ClientAppStarter
assert ClientAppStarter(preload=False).context is None  # --no-preload: a fresh interpreter per ClientApp
starter = ClientAppStarter()
code = '''
import json, sys
loaded = ["torch", "monai", "fedbrats.client.app", "fedbrats.shared.data.dataset", "flwr.supernode.runtime.run_clientapp"]
json.dump({"loaded": [m for m in loaded if m in sys.modules], "cuda": sys.modules["torch"].cuda.is_initialized(),
           "opacus": "opacus" in sys.modules}, open("child.json", "w"))
'''
process = starter.context.Process(target=exec, args=(code, {"__name__": "__main__"}))
process.start()
process.join(60)
print(json.dumps({"exitcode": process.exitcode, "parent_has_torch": "torch" in sys.modules,
                  "child": json.load(open("child.json"))}))
"""


@pytest.mark.slow
def test_the_app_gate_forks_clientapps_with_the_site_code_already_imported(tmp_path):
    """A forked ClientApp starts with torch, MONAI, the site code and Flower's runtime loaded by the gate's fork
    server, not by itself; the gate's own process imports none of it, CUDA is untouched, DP's Opacus waits."""
    found = fresh_python(GATE_PROBE, tmp_path)
    assert found["exitcode"] == 0
    assert not found["parent_has_torch"]  # the imports live in the fork server, not in the polling gate
    assert found["child"] == {"loaded": ["torch", "monai", "fedbrats.client.app", "fedbrats.shared.data.dataset",
                                         "flwr.supernode.runtime.run_clientapp"], "cuda": False, "opacus": False}
