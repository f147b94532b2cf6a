"""Which series is which modality: regular expressions over series descriptions, overridable per site.

Scanners name series freely ("AX T1 POST GAD", "t1_mprage_tra_Gd", "T2W_FLAIR"), so the match is a
rule the user can read and change: for each modality, patterns that must match (`include`, any of
them, in any of `fields`) and patterns that must not (`exclude`, in none of the fields). Text is
lower-cased and `_`, `-`, `.` become spaces before matching, so `\\bt1 ce\\b` also finds "T1_CE".
A site overrides the defaults with a JSON or TOML file naming only what it changes:

    fields = ["SeriesDescription", "ProtocolName"]
    [t1ce]
    include = ["post", "gado"]

Each modality must match exactly one series; two candidates are an error naming both, never a guess,
unless the rules say `choose = "most-voxels"`.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

from fedbrats.shared.constants import MODALITIES

#: What marks a T1 series as contrast-enhanced (shared by the t1ce rule and the t1 rule's exclusions).
_CONTRAST = r"\bt1 ?c\b|\bt1 ?ce\b|\bce\b|\bgd\b|gad|gado|contrast|\+ ?c\b|\+ ?gd|\bpost\b|enhanc|km\b"

DEFAULT_PATTERNS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # modality: (include, exclude); exclusions of other modalities keep the four rules disjoint
    "t1": ((r"\bt1",), (_CONTRAST, r"flair|\bt2")),
    "t1ce": ((rf"\bt1.*({_CONTRAST})", r"\bt1 ?c\b", r"\bt1 ?ce\b"), (r"flair", r"\bpre\b", r"\bt2")),
    "t2": ((r"\bt2",), (r"flair", r"\bt2 ?f\b", r"dark ?fluid", r"\bt2 ?\*", r"star\b", r"\bt1")),
    "flair": ((r"flair", r"\bt2 ?f\b", r"dark ?fluid"), (r"\bt1",)),
}
#: Series no modality may come from: localizers, reformats, derived maps, subtractions.
DEFAULT_EXCLUDE = (
    r"locali[sz]er|\bscout\b|\bsurvey\b|\bmpr\b|reformat|\bmip\b|\badc\b|\bdwi\b|diffusion|\bdti\b|"
    r"\bswi\b|perfusion|\bperf\b|\bsub\b|subtract|\bmoco\b",
)
DEFAULT_FIELDS = ("SeriesDescription", "ProtocolName")
CHOICES = ("error", "most-voxels")


@dataclass(frozen=True)
class ModalityRule:
    """Patterns (regular expressions, searched case-insensitively) that pick one modality's series."""

    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class SeriesRules:
    """The whole matching policy; `to_dict` goes into every case's provenance."""

    modalities: dict[str, ModalityRule] = field(
        default_factory=lambda: {m: ModalityRule(*DEFAULT_PATTERNS[m]) for m in MODALITIES}
    )
    fields: tuple[str, ...] = DEFAULT_FIELDS
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    min_slices: int = 8  # fewer slices is a localizer or a single slice, not a volume
    choose: str = "error"  # two series match one modality: "error", or "most-voxels" (the largest)

    def to_dict(self) -> dict:
        return {
            "fields": list(self.fields),
            "exclude": list(self.exclude),
            "min_slices": self.min_slices,
            "choose": self.choose,
            **{
                m: {"include": list(r.include), "exclude": list(r.exclude)}
                for m, r in self.modalities.items()
            },
        }


def normalise(text: str) -> str:
    """Lower case, `_ - .` as spaces, runs of spaces as one: the text the patterns see."""
    return " ".join(re.sub(r"[_\-.]+", " ", text.lower()).split())


def _patterns(value, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: expected a list of regular expressions (strings), got {value!r}")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"{where}: {pattern!r} is not a valid regular expression ({error})") from None
    return tuple(value)


def rules_from_dict(data: dict, source: str = "rules") -> SeriesRules:
    """Defaults overridden by `data` (the parsed rules file); unknown keys are errors naming them."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a table of rules, got {type(data).__name__}")
    known = {"fields", "exclude", "min_slices", "choose", *MODALITIES}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    rules = SeriesRules()
    modalities = dict(rules.modalities)
    for modality in MODALITIES:
        if modality not in data:
            continue
        entry = data[modality]
        if not isinstance(entry, dict) or not set(entry) <= {"include", "exclude"}:
            raise ValueError(
                f"{source}: [{modality}] must hold only 'include' and 'exclude' lists, got {entry!r}"
            )
        base = modalities[modality]
        modalities[modality] = ModalityRule(
            _patterns(entry.get("include", list(base.include)), f"{source}: {modality}.include"),
            _patterns(entry.get("exclude", list(base.exclude)), f"{source}: {modality}.exclude"),
        )
    rules = replace(rules, modalities=modalities)
    if "fields" in data:
        rules = replace(rules, fields=_patterns(data["fields"], f"{source}: fields"))
    if "exclude" in data:
        rules = replace(rules, exclude=_patterns(data["exclude"], f"{source}: exclude"))
    if "min_slices" in data:
        value = data["min_slices"]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{source}: min_slices must be a whole number >= 1, got {value!r}")
        rules = replace(rules, min_slices=value)
    if "choose" in data:
        if data["choose"] not in CHOICES:
            raise ValueError(f"{source}: choose must be one of {list(CHOICES)}, got {data['choose']!r}")
        rules = replace(rules, choose=data["choose"])
    return rules


def load_rules(path: Path | None) -> SeriesRules:
    """The default rules, overridden by a .json or .toml file when one is given."""
    if path is None:
        return SeriesRules()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rules file {path} does not exist; expected a .json or .toml file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"rules file {path}: suffix {path.suffix!r}; expected .json or .toml")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"rules file {path}: cannot parse ({error})") from None
    return rules_from_dict(data, str(path))


def _search(patterns: tuple[str, ...], texts: list[str]) -> bool:
    return any(re.search(p, t, flags=re.IGNORECASE) for p in patterns for t in texts)


def modalities_of(fields: dict[str, str], rules: SeriesRules) -> list[str]:
    """Every modality whose rule accepts a series with these header fields (usually one or none)."""
    texts = [normalise(fields.get(name, "")) for name in rules.fields]
    texts = [t for t in texts if t]
    if not texts or _search(rules.exclude, texts):
        return []
    return [
        m for m, r in rules.modalities.items() if _search(r.include, texts) and not _search(r.exclude, texts)
    ]
