"""The one atomic-write helper: whole new content or the old one, no temporary files left behind."""

import json
import os

import pytest

from fedbrats.shared.atomic import atomic_write, atomic_write_json, atomic_write_text


def test_replaces_content_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "state.json"
    atomic_write_json(target, {"round": 1})
    atomic_write_json(target, {"round": 2})
    assert json.loads(target.read_text()) == {"round": 2}
    assert os.listdir(target.parent) == ["state.json"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, b"new")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_permissions_follow_the_umask_unless_a_mode_is_given(tmp_path):
    old = os.umask(0o022)
    try:
        report = atomic_write_text(tmp_path / "report.md", "# run")
        key = atomic_write(tmp_path / "site.key", b"secret", mode=0o600)
    finally:
        os.umask(old)
    assert report.stat().st_mode & 0o777 == 0o644
    assert key.stat().st_mode & 0o777 == 0o600
