"""The site's signing key and where the site's privacy ledger lives.

A ledger is evidence only if a later edit is detectable (DESIGN section 10): every ledger row is
signed with a key the site holds. Supported keys: Ed25519 (signed as is) and ECDSA on P-256 or
P-384 (SHA-256 / SHA-384), unencrypted PEM (PKCS#8 or the OpenSSL "EC PRIVATE KEY" form), so a
SuperNode's own EC authentication key can serve. RSA and other curves are refused.

Where the ledger lives (the budget belongs to the site, not to a folder):

- node config ``ledger-dir`` names the ledger home; otherwise a simulated site (``partition-id``
  and no ``work-dir``) keeps it beside the run, in ``RUN_DIR/sites/<site>`` (a simulated run is a
  new set of virtual hospitals), and a deployed site keeps it in a per-host home,
  ``$XDG_DATA_HOME/fedbrats/ledgers`` (default ``~/.local/share/fedbrats/ledgers``), never in
  ``work-dir``: pointing ``work-dir`` at a new folder does not start a fresh budget.
- inside the home, a site with node config ``ledger-key`` (a PEM private key) keeps its ledger in
  ``key-<first 16 hex digits of the key fingerprint>/``, so renaming the site does not start a
  fresh budget either; a site without one keeps it in ``<site name>/`` with a key generated once
  beside the ledger (``site_key.pem``, mode 0600).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fedbrats.shared.atomic import atomic_write

__all__ = [
    "KEY_FILENAME", "SiteKeyError", "SiteKey", "key_id", "ledger_folder", "public_fingerprint", "verify_signature",
]  # fmt: skip

KEY_FILENAME = "site_key.pem"
_CURVES = {"secp256r1": hashes.SHA256, "secp384r1": hashes.SHA384}


class SiteKeyError(RuntimeError):
    """A site key cannot be read or used; the message names the file and what was expected."""


def public_fingerprint(public_pem: bytes | str) -> str:
    """SHA-256 (hex) of the public key's DER SubjectPublicKeyInfo: the site's identity in ledgers and reports."""
    key = serialization.load_pem_public_key(
        public_pem.encode() if isinstance(public_pem, str) else public_pem
    )
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def key_id(fingerprint: str) -> int:
    """The first 48 bits of a fingerprint as an integer: a Flower metric carries it exactly (as a float)."""
    return int(fingerprint[:12], 16)


def verify_signature(public_pem: bytes | str, signature: bytes, data: bytes) -> bool:
    """True when `signature` over `data` verifies with the PEM public key."""
    try:
        key = serialization.load_pem_public_key(
            public_pem.encode() if isinstance(public_pem, str) else public_pem
        )
    except ValueError:
        return False
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, data)
        elif isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _CURVES:
            key.verify(signature, data, ec.ECDSA(_CURVES[key.curve.name]()))
        else:
            return False
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True)
class SiteKey:
    """A private key the site signs its ledger rows with."""

    private: Any
    path: Path

    @classmethod
    def load(cls, path: Path | str) -> SiteKey:
        """Read a PEM private key (Ed25519, EC P-256 or EC P-384, unencrypted)."""
        path = Path(path)
        if not path.is_file():
            raise SiteKeyError(
                f"site key {path} does not exist; expected a PEM private key (Ed25519 or EC P-256/P-384)"
            )
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise SiteKeyError(
                f"site key {path} is readable by others (mode {mode:o}); run: chmod 600 {path}"
            )
        try:
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as err:
            raise SiteKeyError(f"site key {path} is not an unencrypted PEM private key: {err}") from err
        if isinstance(private, ec.EllipticCurvePrivateKey):
            if private.curve.name not in _CURVES:
                raise SiteKeyError(
                    f"site key {path} is on curve {private.curve.name}; expected P-256 or P-384 (or Ed25519)"
                )
        elif not isinstance(private, ed25519.Ed25519PrivateKey):
            raise SiteKeyError(
                f"site key {path} is a {type(private).__name__}; expected Ed25519 or EC P-256/P-384"
            )
        return cls(private, path)

    @classmethod
    def load_or_create(cls, path: Path | str) -> SiteKey:
        """The key at `path`, generated once (Ed25519, mode 0600) when there is none."""
        path = Path(path)
        if not path.exists():
            pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            atomic_write(path, pem)  # mkstemp creates the file 0600 before a byte is written
            os.chmod(path, 0o600)
        return cls.load(path)

    @property
    def public_pem(self) -> str:
        return (
            self.private.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )

    @property
    def fingerprint(self) -> str:
        return public_fingerprint(self.public_pem)

    def sign(self, data: bytes) -> bytes:
        if isinstance(self.private, ed25519.Ed25519PrivateKey):
            return self.private.sign(data)
        return self.private.sign(data, ec.ECDSA(_CURVES[self.private.curve.name]()))


def _default_home() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "fedbrats" / "ledgers"


def _safe(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".")
    if not cleaned:
        raise SiteKeyError(
            f"site name {name!r} cannot name a ledger folder; set ledger-key or another site-name"
        )
    return cleaned


def ledger_folder(node_config: dict[str, Any], site_name: str, work_dir: Path) -> tuple[Path, SiteKey]:
    """The folder of the site's ledger and the key that signs it, by the rule in this module's docstring."""
    if node_config.get("ledger-dir"):
        home = Path(str(node_config["ledger-dir"])).expanduser()
    elif "partition-id" in node_config and not node_config.get("work-dir"):
        home = Path(work_dir).parent  # RUN_DIR/sites: the ledger is in the site's own run folder
    else:
        home = _default_home()
    if node_config.get("ledger-key"):
        key = SiteKey.load(Path(str(node_config["ledger-key"])).expanduser())
        return home / f"key-{key.fingerprint[:16]}", key
    folder = home / _safe(site_name)
    return folder, SiteKey.load_or_create(folder / KEY_FILENAME)
