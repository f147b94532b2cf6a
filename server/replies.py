"""Every reply is data from another party: it is validated before anything else reads it.

A site (or whoever holds its credentials) controls every byte of its reply. Before the round loop,
the strategy or the history touches a reply, this module checks it as data: records of the
expected names only; metrics that are finite scalars of known keys within their bounds (a schema
per message type, plus the metrics a strategy declares it needs); ``num-examples`` a whole number
>= 1 and no larger than what the site reported the first time it replied in this run, or the
configured cap; every ``Array`` a plain ``.npy`` payload whose bytes match its declared shape and
dtype; site names sanitised and unique per node. A reply that fails is dropped with a reason the
history keeps, and the round goes on with the rest. Replies handed on are consistent with each
other (same metric keys), so Flower's own ``_check_and_log_replies`` never raises
``InconsistentMessageReplies`` on them.
"""

from __future__ import annotations

import functools
import io
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ConfigRecord, Message, RecordDict

from fedbrats.shared.constants import REGIONS
from fedbrats.strategies.scaffold import CONTROL, CONTROL_DELTA

TRAIN, EVALUATE = "train", "evaluate"

#: A reply with more metric keys is dropped before its keys are read (200,000 keys were 40 MB of history).
MAX_METRIC_KEYS = 64
#: Longest site name kept (characters); longer names are cut.
MAX_NAME = 64
#: Longest text from a site (an error reason) kept in the history and logs.
MAX_TEXT = 200

UNIT = (0.0, 1.0)
NON_NEGATIVE = (0.0, math.inf)
ANY = (-math.inf, math.inf)

#: What a site legitimately sends after training (client/app.py, client/privacy.py) and the bounds.
TRAIN_METRICS: dict[str, tuple[float, float]] = {
    "num-examples": (1.0, math.inf), "num-val": NON_NEGATIVE, "examples-seen": NON_NEGATIVE,
    "local-steps": NON_NEGATIVE, "seconds": NON_NEGATIVE, "lr": NON_NEGATIVE, "skipped-cases": NON_NEGATIVE,
    "train-loss": NON_NEGATIVE, "loss-before": NON_NEGATIVE, "loss-after": NON_NEGATIVE,
    "epsilon": NON_NEGATIVE, "delta": UNIT, "epsilon-budget": NON_NEGATIVE, "noise-multiplier": NON_NEGATIVE,
    "sample-rate": UNIT, "dp-steps": NON_NEGATIVE,
    "ledger-row": NON_NEGATIVE, "ledger-head": NON_NEGATIVE, "ledger-key": NON_NEGATIVE,
}  # fmt: skip

#: What a site sends after evaluation (client/trainer.py flat_metrics, hyphenated).
EVALUATE_METRICS: dict[str, tuple[float, float]] = {
    "num-examples": (1.0, math.inf), "eval-seconds": NON_NEGATIVE, "mean-dice": UNIT,
    **{f"{m}-{r}": UNIT for m in ("dice", "sensitivity", "specificity") for r in REGIONS},
    **{f"hd95-{r}": NON_NEGATIVE for r in REGIONS},
    # tasks that classify (shared.tasks.class_metrics); auc-undefined is 1 when the site's AUC is undefined
    "auc": UNIT, "auc-undefined": UNIT, "balanced-accuracy": UNIT, "sensitivity": UNIT, "specificity": UNIT,
    "accuracy": UNIT,
}  # fmt: skip

#: The optional array record of an evaluation reply: a classifier's score histograms (counts per true
#: class, scored class and score bin; client/app.py), never per-case scores.
SCORES, HISTOGRAMS = "scores", "histograms"

#: evaluate-in-train: a training reply's evaluation of the incoming model (metrics, or why there is none;
#: client/app.py), taken out before the reply is checked as a training reply.
EVALUATION, EVALUATION_ERROR = "evaluation", "evaluation-error"

#: Counts: whole numbers.
WHOLE = frozenset({"num-examples", "num-val", "examples-seen", "local-steps", "skipped-cases", "dp-steps",
                   "ledger-row", "ledger-head", "ledger-key"})

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def shown(value: Any, limit: int = 40) -> str:
    """A site-supplied value as it may appear in a reason: escaped (``ascii``) and cut."""
    text = ascii(value) if isinstance(value, str) else ascii(type(value).__name__)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clean_text(text: Any, limit: int = MAX_TEXT) -> str:
    """Printable ASCII only (no newlines, no terminal escapes), at most `limit` characters."""
    text = str(text)[: limit * 4]
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


def safe_site_name(claimed: Any, node: int) -> str:
    """A name safe for history, logs, terminals and file names: ``[A-Za-z0-9._-]``, no leading
    dots or dashes, at most MAX_NAME characters; ``node-<id>`` when nothing usable is left."""
    text = claimed if isinstance(claimed, str) else ""
    text = _UNSAFE.sub("_", text[: MAX_NAME * 4]).strip("._-")[:MAX_NAME].rstrip("._-")
    return text or f"node-{node}"


def array_problem(name: str, array: Any) -> str | None:
    """Why an Array's bytes are not what it declares (serialisation, dtype, shape, length), or None."""
    label = f"array {shown(name)}"
    if not isinstance(array, Array):
        return f"{label} is a {type(array).__name__}, expected a Flower Array"
    if array.stype != "numpy.ndarray":
        return f"{label} has serialisation {shown(array.stype)}, expected 'numpy.ndarray'"
    if not isinstance(array.data, bytes):
        return f"{label} carries no bytes"
    try:
        declared = np.dtype(array.dtype)
    except (TypeError, ValueError):
        return f"{label} declares dtype {shown(array.dtype)}, not a numpy dtype"
    if declared.kind not in "biuf" or declared.hasobject:
        return f"{label} declares dtype {declared}, expected a numeric dtype"
    shape = tuple(array.shape) if isinstance(array.shape, list | tuple) else None
    if shape is None or not all(isinstance(n, int) and n >= 0 for n in shape):
        return f"{label} declares shape {shown(str(array.shape))}, expected non-negative whole numbers"
    header = _npy_header(declared.str, shape)  # what np.save writes for it: the common case, no parsing
    if array.data.startswith(header) and len(array.data) == len(header) + math.prod(shape) * declared.itemsize:
        return None
    stream = io.BytesIO(array.data)
    try:
        version = np.lib.format.read_magic(stream)
        reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in reader:
            return f"{label} has .npy format {version}, expected 1.0 or 2.0"
        held_shape, _fortran, held_dtype = reader[version](stream)
    except (ValueError, TypeError, SyntaxError, OSError) as err:
        return f"{label} is not a .npy payload ({clean_text(err, 80)})"
    if held_dtype != declared:
        return f"{label} declares dtype {declared} but its bytes hold {held_dtype}"
    if tuple(held_shape) != shape:
        return f"{label} declares shape {shape} but its bytes hold {tuple(held_shape)}"
    needed = stream.tell() + math.prod(shape) * declared.itemsize
    if len(array.data) != needed:
        return f"{label} has {len(array.data)} bytes; shape {shape} of {declared} needs {needed}"
    return None


@functools.lru_cache(maxsize=4096)
def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    """The .npy 1.0 header `np.save` writes for a C-ordered array of `descr` and `shape`."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": descr, "fortran_order": False, "shape": shape})
    return head.getvalue()


def histograms_problem(record: Any, cases: float) -> str | None:
    """Why a "scores" record is not one array of non-negative whole counts [classes, 1 or classes, bins]
    that counts each of the site's `cases` (num-examples) once per scored class."""
    if set(record.keys()) != {HISTOGRAMS}:
        return f"the {SCORES!r} record holds {sorted(clean_text(n, 40) for n in record.keys())[:5]}, expected [{HISTOGRAMS!r}]"
    counts = record[HISTOGRAMS].numpy()
    if counts.dtype.kind not in "iu" or counts.ndim != 3 or counts.shape[0] < 2 or counts.shape[1] not in (1, counts.shape[0]):
        return f"{HISTOGRAMS} of dtype {counts.dtype} and shape {counts.shape}, expected whole counts [K, 1 or K, bins]"
    if counts.size and counts.min() < 0:
        return f"{HISTOGRAMS} hold a negative count"
    per_scored_class = counts.sum(axis=(0, 2))
    if (per_scored_class != cases).any():
        return f"{HISTOGRAMS} count {per_scored_class.tolist()[:5]} cases, num-examples says {cases:.6g}"
    return None


@dataclass
class EmbeddedEvaluation:
    """The evaluation a training reply carried (evaluate-in-train), shaped as an evaluate reply so that
    `ReplyValidator.check` validates it like one; `error` holds the site's reason when it sent none."""

    content: RecordDict
    error: Any = None

    def has_error(self) -> bool:
        return self.error is not None


@dataclass
class _Reason:
    reason: str


def split_evaluation(reply: Message) -> EmbeddedEvaluation:
    """Take the evaluation records out of a training reply (Flower's strategies accept exactly one
    MetricRecord); what remains is checked as a training reply, what was taken as an evaluate reply."""
    if reply.has_error():
        return EmbeddedEvaluation(RecordDict(), _Reason(reply.error.reason))
    content, evaluation = reply.content, RecordDict()
    if "site" in content.config_records:
        evaluation["site"] = ConfigRecord(dict(content.config_records["site"]))
    if EVALUATION in content.metric_records:
        evaluation["metrics"] = content.pop(EVALUATION)
    if SCORES in content.array_records:
        evaluation[SCORES] = content.pop(SCORES)
    if EVALUATION_ERROR in content.config_records:
        return EmbeddedEvaluation(evaluation, _Reason(str(content.pop(EVALUATION_ERROR).get("reason", ""))))
    if "metrics" not in evaluation:
        return EmbeddedEvaluation(evaluation, _Reason("its training reply carried no evaluation of the incoming model"))
    return EmbeddedEvaluation(evaluation)


@dataclass
class CheckedReply:
    """One reply after validation: the site's sanitised name, its metrics (floats) or why it is dropped."""

    reply: Message
    node: int
    site: str
    metrics: dict[str, float] = field(default_factory=dict)
    problem: str | None = None


def reply_arrays(messages: Iterable[Message]) -> tuple[str, ...]:
    """The array records a training reply must carry: the model, and SCAFFOLD's control-variate
    change when the server sent a control variate."""
    sent_control = any(CONTROL in m.content.array_records for m in messages)
    return ("arrays", CONTROL_DELTA) if sent_control else ("arrays",)


class ReplyValidator:
    """Validates the replies of one run; remembers each node's name and each site's first sizes.

    Parameters
    ----------
    max_num_examples : int
        Cap on ``num-examples`` (0: only the site's first reported value bounds it).
    extra_metrics : mapping of message type -> metric names
        Keys a strategy needs beyond the schema (accepted as any finite number).
    """

    def __init__(
        self, *, max_num_examples: int = 0, extra_metrics: Mapping[str, Iterable[str]] | None = None,
        max_metric_keys: int = MAX_METRIC_KEYS,
    ) -> None:  # fmt: skip
        self.max_num_examples = int(max_num_examples)
        self.max_metric_keys = int(max_metric_keys)
        # Each type's own keys, then the other type's: a known key with a bounded value is harmless in
        # either (sites and test doubles send num-val with evaluations, Dice with training replies).
        self.schemas = {TRAIN: {**EVALUATE_METRICS, **TRAIN_METRICS}, EVALUATE: {**TRAIN_METRICS, **EVALUATE_METRICS}}
        for kind, names in (extra_metrics or {}).items():
            for name in names:
                self.schemas[kind].setdefault(name, ANY)
        self.names: dict[int, str] = {}  # node -> the name it claimed first, sanitised and unique
        self.first_sizes: dict[tuple[str, str], int] = {}  # (message type, site) -> first num-examples

    @classmethod
    def for_run(cls, config: Any, required_metrics: Iterable[str] = ()) -> ReplyValidator:
        """The validator of a run: `config`'s cap, plus the metrics the run's strategy needs."""
        return cls(max_num_examples=config.max_num_examples, extra_metrics={TRAIN: tuple(required_metrics)})

    def restore(self, history: Iterable[Mapping[str, Any]]) -> None:
        """Take the first reported sizes back from a resumed run's history, so a restart is no reset."""
        for record in history:
            for kind in (TRAIN, EVALUATE):
                for entry in record.get(kind, []) or []:
                    size = entry.get("num-examples")
                    if entry.get("dropped") is None and isinstance(size, int | float) and math.isfinite(size):
                        self.first_sizes.setdefault((kind, str(entry.get("site"))), int(size))

    # --- names ----------------------------------------------------------------------------
    def site(self, node: int) -> str:
        return self.names.get(node, f"node-{node}")

    def claim(self, node: int, claimed: Any) -> str:
        """The node's name: its first claim, sanitised; a name another node holds gets a suffix."""
        if node in self.names:
            return self.names[node]
        base = safe_site_name(claimed, node)
        taken = set(self.names.values())
        name, n = base, 1
        while name in taken:
            name = f"{base}--node-{node}" if n == 1 else f"{base}--node-{node}-{n}"
            n += 1
        self.names[node] = name
        return name

    # --- one reply ------------------------------------------------------------------------
    def check(self, kind: str, reply: Message, node: int, array_records: Iterable[str] = ()) -> CheckedReply:
        """Validate one reply of message type `kind` (train/evaluate) expecting `array_records`."""
        if reply.has_error():
            return CheckedReply(reply, node, self.site(node), problem=f"site error: {clean_text(reply.error.reason)}")
        content = reply.content
        configs = content.config_records
        claimed = configs["site"].get("name") if "site" in configs else None
        result = CheckedReply(reply, node, self.claim(node, claimed))
        array_records = set(array_records) | ({SCORES} if kind == EVALUATE and SCORES in content.array_records else set())
        result.problem = self._records_problem(content, array_records)
        if result.problem is None:
            result.metrics, result.problem = self._metrics(kind, content.metric_records["metrics"], result.site)
        if result.problem is None:
            result.problem = next(
                (p for r in sorted(array_records) for n, a in content.array_records[r].items() if (p := array_problem(n, a))),
                None,
            )
        if result.problem is None and SCORES in array_records:
            result.problem = histograms_problem(content.array_records[SCORES], result.metrics["num-examples"])
        if result.problem is None and "site" in configs:
            content["site"] = ConfigRecord({"name": result.site})  # strategies read the sanitised name
        return result

    def _records_problem(self, content: Any, array_records: set[str]) -> str | None:
        metrics, arrays, configs = (set(content.metric_records), set(content.array_records), set(content.config_records))
        if metrics != {"metrics"}:
            return f"metric records {sorted(clean_text(n, 40) for n in metrics)[:5]}, expected exactly ['metrics']"
        if arrays != array_records:
            return f"array records {sorted(clean_text(n, 40) for n in arrays)[:5]}, expected {sorted(array_records)}"
        if not configs <= {"site"}:
            return f"unexpected config records {sorted(clean_text(n, 40) for n in configs - {'site'})[:5]}"
        if "site" in configs and set(content.config_records["site"].keys()) - {"name"}:
            return "the 'site' record holds more than a 'name'"
        return None

    def _metrics(self, kind: str, record: Mapping[str, Any], site: str) -> tuple[dict[str, float], str | None]:
        schema = self.schemas[kind]
        if len(record) > self.max_metric_keys:
            return {}, f"{len(record)} metric keys, at most {self.max_metric_keys}"
        values: dict[str, float] = {}
        for key, value in record.items():
            if key not in schema:
                return {}, f"unknown metric key {shown(key)} for a {kind} reply"
            if isinstance(value, list):
                return {}, f"metric {key!r} is a list, expected one number"
            if isinstance(value, bool) or not isinstance(value, int | float):
                return {}, f"metric {key!r} is a {type(value).__name__}, expected a number"
            number = float(value)
            if not math.isfinite(number):
                return {}, f"metric {key!r} is {number}, expected a finite number"
            low, high = schema[key]
            if not low <= number <= high:
                return {}, f"metric {key!r} is {number:.6g}, expected a value in [{low:g}, {high:g}]"
            if key in WHOLE and number != int(number):
                return {}, f"metric {key!r} is {number:.6g}, expected a whole number"
            values[key] = number
        if "num-examples" not in values:
            return {}, "metric 'num-examples' missing"
        return values, self._size_problem(kind, site, values["num-examples"])

    def _size_problem(self, kind: str, site: str, size: float) -> str | None:
        if self.max_num_examples > 0 and size > self.max_num_examples:
            return f"num-examples {size:.6g} exceeds the configured cap max-num-examples={self.max_num_examples}"
        first = self.first_sizes.get((kind, site))
        if first is not None and size > first:
            return f"num-examples {size:.6g} exceeds {first}, what the site reported first in this run"
        return None

    # --- one round ------------------------------------------------------------------------
    def check_round(
        self, kind: str, replies: Iterable[tuple[Message, int]], array_records: Iterable[str] = ()
    ) -> list[CheckedReply]:
        """Validate a round's (reply, node) pairs in node order (so name claims do not depend on
        arrival order); of training replies, drop those whose metric keys differ from the round's most
        common set (ties: the smaller set): Flower's strategies refuse a round of unequal keys.
        Records each site's first accepted ``num-examples``."""
        records = tuple(array_records)
        checked = [self.check(kind, reply, node, records) for reply, node in sorted(replies, key=lambda p: p[1])]
        usable = [c for c in checked if c.problem is None]
        keysets = Counter(frozenset(c.metrics) for c in usable)
        if kind == TRAIN and len(keysets) > 1:  # evaluations never reach a Flower strategy
            common = min(keysets, key=lambda k: (-keysets[k], len(k), sorted(k)))
            for c in usable:
                if frozenset(c.metrics) != common:
                    missing, extra = sorted(common - set(c.metrics)), sorted(set(c.metrics) - common)
                    c.problem = f"metric keys differ from the round's other replies: missing {missing}, unexpected {extra}"
        for c in checked:
            if c.problem is None:
                self.first_sizes.setdefault((kind, c.site), int(c.metrics["num-examples"]))
        return checked
