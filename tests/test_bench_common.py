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


def test_the_curation_benchmark_pollutes_with_what_it_says():
    """A near copy of an interaction of the corpora's size (~90 words) is one the daemon's index calls a
    near-duplicate of its template; every junk item is junk by the daemon's rule; the template is not."""
    import random

    from bench.curation import junk_items, near_copy
    from learners.curation import ContentIndex
    from policies.curation import content_key, junk, text_stats

    sentence = ("The stream keeps every entry until the consumer group acknowledges it, and a reader that "
                "crashes gets the entries it held delivered again to the next reader of the group. An entry "
                "that fails again and again is moved to the dead letter stream with its reason, where an "
                "operator reads it, mends the producer and publishes the entry once more by hand.")
    template = {"id": "t", "prompt": "Explain how the stream " + sentence[:60], "response": sentence,
                "meta": {"domain": "man"}}
    index = ContentIndex(100)
    index.add(content_key(template["prompt"], template["response"]),
              index.minhash(template["prompt"], template["response"]))
    rng = random.Random(0)
    copies = [near_copy(template, rng, i) for i in range(20)]
    assert len({c["id"] for c in copies}) == 20 and all(c["response"] != sentence for c in copies[:5])
    assert all(index.similarity(index.minhash(c["prompt"], c["response"])) >= 0.8 for c in copies)
    assert junk(text_stats(sentence)) is None
    assert all(junk(text_stats(j["response"])) for j in junk_items(30, rng, ["man", "c"]))


def test_the_continual_targets_compare_default_with_naive_and_joint(tmp_path):
    import json

    from bench.continual import targets

    def res(forgetting, plasticity, ppl, commit="abc"):
        return {"summary": {"avg_forgetting": forgetting, "plasticity": plasticity, "avg_final_ppl": ppl},
                "rollbacks": 2, "deferred": 5, "refused": 0, "commit": commit}

    (tmp_path / "continual-unlike-reverse-s1.json").write_text(json.dumps({"configs": {
        "naive": res(0.4, [1.0, 2.0], 14.0), "default": res(0.1, [1.02, 2.1], 12.6),
        "joint": res(0, [], 12.0)}}))
    (tmp_path / "continual-quick.json").write_text("{}")  # a smoke run is not a variant
    rows = targets(tmp_path.glob("*.json")).splitlines()[2:]
    assert rows == ["| unlike | reverse | 1 | continual-unlike-reverse-s1.json | 0.25 | 1.050 | 1.050 | 2 | 5 | 0 "
                    "| abc |"]
    # Without a joint of its own, a file is compared with the other order's joint on the same data only.
    data = {"domains": ["a", "b"], "foundation_loss": [2.0, 3.0]}
    (tmp_path / "continual-unlike-forward-s0-n160.json").write_text(json.dumps({**data, "configs": {
        "naive": res(0.4, [1.0, 2.0], 14.0), "default": res(0.1, [1.0, 2.0], 12.6), "joint": res(0, [], 12.0)}}))
    reverse = {"domains": ["b", "a"], "foundation_loss": [3.0, 2.0], "configs": {
        "naive": res(0.4, [2.0, 1.0], 14.0), "default": res(0.1, [2.0, 1.0], 13.2)}}
    (tmp_path / "continual-unlike-reverse-s0-n160.json").write_text(json.dumps(reverse))
    (tmp_path / "continual-unlike-reverse-s0.json").write_text(json.dumps(reverse))  # another size: no twin
    rows = targets(tmp_path.glob("*.json")).splitlines()[2:]
    assert "| continual-unlike-reverse-s0-n160.json | 0.25 | 1.000 | 1.100* |" in rows[1]
    assert "| continual-unlike-reverse-s0.json | 0.25 | 1.000 | - |" in rows[2]
    # The related suite's forward order at seed 0 has the short name; it is still the reverse order's twin.
    related = {"domains": ["c", "d"], "foundation_loss": [2.0, 3.0]}
    (tmp_path / "continual-h0.1.json").write_text(json.dumps({**related, "configs": {
        "naive": res(0.4, [1.0, 2.0], 14.0), "default": res(0.1, [1.0, 2.0], 12.6), "joint": res(0, [], 12.0)}}))
    (tmp_path / "continual-related-reverse-s0-h0.1.json").write_text(json.dumps({
        "domains": ["d", "c"], "foundation_loss": [3.0, 2.0], "configs": {
            "naive": res(0.4, [2.0, 1.0], 14.0), "default": res(0.1, [2.0, 1.0], 12.0)}}))
    rows = targets(tmp_path.glob("*.json")).splitlines()[2:]
    assert any(r.startswith("| related | forward | 0 | continual-h0.1.json |") and "| 1.050 |" in r for r in rows)
    assert any(r.startswith("| related | reverse | 0 | continual-related-reverse-s0-h0.1.json |")
               and "| 1.000* |" in r for r in rows)


def test_make_bench_runs_every_benchmark_and_its_smoke_runs_keep_the_suite():
    """Every benchmark module with a ``main`` is a step of ``make bench``; a quick run keeps a step's suite
    but none of its sizes, and memory's smoke run is one step."""
    from bench.run import STEPS, arguments

    modules = {p.stem for p in ROOT.glob("*.py") if "\ndef main(" in p.read_text()}
    inner = {"run", "avalanche_baselines", "continual_sweep"}  # make bench itself; a subprocess; an in-process study
    assert modules - inner == {m for m, _ in STEPS}
    unlike = ["--suite", "unlike", "--per-stage", "160", "--heldout-fraction", "0.1"]  # the gate judging
    assert ("continual", [*unlike, "--configs", "naive,default,joint"]) in STEPS
    assert ("continual", [*unlike, "--order", "reverse", "--configs", "naive,default"]) in STEPS
    assert arguments("continual", ["--suite", "unlike", "--per-stage", "160"], quick=True) == ["--quick", "--suite",
                                                                                                 "unlike"]
    assert arguments("heal_scaling", ["--reconstruct", "--out", "x.json"], quick=True) == ["--quick"]
    assert arguments("memory", [], quick=True) == ["--steps", "1"]
    assert arguments("reduction", ["--a"], quick=False) == ["--a"]


def test_a_result_stored_before_provenance_was_recorded_says_so():
    from bench.common import RESULTS, run_line

    old = {"provenance": {"commit": "?", "recorded": False, "stored_in": "4a9bb86"}}
    assert run_line(old) == "(one run; its commit was not recorded: at or before 4a9bb86, which stored it)"
    assert run_line({"provenance": {"commit": "abc", "dirty": True}}) == "(one run: commit abc+dirty)"
    import json

    for path in RESULTS.glob("*.json"):  # every stored result says what it ran on, or that it was not recorded
        p = json.loads(path.read_text()).get("provenance")
        assert isinstance(p, dict), f"{path.name} has no provenance"
        if p.get("recorded") is False:
            assert p.get("stored_in") and p.get("note"), path.name
        else:
            assert {"commit", "dirty", "packages", "device", "threads"} <= set(p), path.name


def test_the_packages_the_tests_install_never_become_benchmark_documents():
    """`make test` installs prometheus and what it pulls in (changelogs, man pages, JavaScript): drawn from,
    they reshuffled every benchmark's corpus (65 of 66 man pages changed). Their files are left out."""
    from pathlib import Path

    from daemon.corpus import INSTALLED_BY_TESTS, _files, changelog_docs

    changelogs = list(Path("/usr/share/doc").glob("*/changelog.Debian.gz"))
    theirs = {p for p in changelogs if p.parent.name in INSTALLED_BY_TESTS}
    assert theirs, "make test installs prometheus first (.ci/services.sh): its changelog must be here"
    assert set(_files(changelogs)) == set(changelogs) - theirs
    names = {d.name for d in changelog_docs(10_000)}
    assert len(names) > 100 and not names & set(INSTALLED_BY_TESTS)
