"""What a ClientApp process imports to answer a message, in one module.

In a deployment every message is a fresh ClientApp process, and a fresh interpreter paid 3-4 s a
message for torch, MONAI and the site code (benchmarks/RESULTS.md). The hospital's app gate imports
this module once, in a fork server, and forks each ClientApp process from it, so every message still
gets a process of its own (a crash or a leak dies with it) without paying the imports again.
Nothing here may start a thread or touch CUDA: a process forked after either is not safe.
"""

from __future__ import annotations

import fedbrats.client.app  # noqa: F401  torch, Flower's app API, the site code
from fedbrats.client.monai_import import import_monai_light

import_monai_light()  # MONAI as a site imports it, before the data stack below imports it in full

import fedbrats.shared.data.dataset  # noqa: E402, F401  the data stack a train message opens
import fedbrats.shared.data.transforms  # noqa: E402, F401
import fedbrats.shared.evaluation.metrics  # noqa: E402, F401  what an evaluate message adds
