"""What every benchmark result records about how it was measured, and how a table marks its rows' commits."""
from __future__ import annotations

import subprocess

from bench.common import ROOT, commit, commit_marks, provenance


def test_results_record_commit_dirty_flag_packages_device_and_threads():
    p = provenance()
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                          cwd=ROOT.parent).stdout.strip()
    assert p["commit"] == head and isinstance(p["dirty"], bool)
    assert p["packages"]["torch"] and p["packages"]["transformers"] and p["packages"]["peft"]
    assert p["device"] and p["threads"] >= 1 and p["written_at"].endswith("Z")


def test_a_table_names_one_commit_or_marks_every_row():
    same = [{"commit": "abc", "dirty": False}] * 2
    assert commit_marks(same) == ("(all rows: commit abc)", ["", ""])
    note, marks = commit_marks([{"commit": "abc"}, {"commit": "def", "dirty": True}, {}])
    assert "each row" in note and marks == [" [abc]", " [def+dirty]", " [?]"]
    assert set(commit()) == {"commit", "dirty"}
