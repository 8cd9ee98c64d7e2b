"""The browser test's own logic that needs no browser: when it skips or fails, and small helpers."""
from __future__ import annotations

from pathlib import Path

import browser_util as bu
import pytest


def test_missing_chromium_skips_locally_and_fails_in_ci(monkeypatch, tmp_path):
    monkeypatch.setattr(bu, "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install -y chromium"):
        bu.need_browser()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="cannot run in CI"):
        bu.need_browser()


def test_new_entries_count_repeats():
    assert bu._new(["a", "b", "a"], ["a"]) == ["b", "a"]
    assert bu._new(["a"], ["a", "a"]) == []


def test_server_refuses_two_notebooks_of_one_name(tmp_path):
    with pytest.raises(ValueError, match="unique"):
        bu.LabServer([tmp_path / "x" / "a.ipynb", tmp_path / "y" / "a.ipynb"], tmp_path)


def test_report_describes_its_problems():
    report = bu.Report("n.ipynb", problems=["cell 3 raised ValueError: x"], screenshot=Path("s.png"))
    assert not report.ok
    assert "cell 3 raised ValueError: x" in report.describe() and "s.png" in report.describe()
