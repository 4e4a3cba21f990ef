import subprocess
import sys

import pytest

from daemon.config import SettingsError, load_settings


def test_defaults_follow_the_contract(monkeypatch):
    for k in list(__import__("os").environ):
        if k.startswith("CASCADE_"):
            monkeypatch.delenv(k)
    s = load_settings()
    assert str(s.home) == ".cascade" and s.redis_url is None and s.ray_address is None
    assert s.stream == "cascade:interactions" and s.group == "cascade"
    assert s.metrics_host == "127.0.0.1" and s.metrics_port == 9477
    assert s.gate is True and s.max_entry_bytes == 64 * 1024
    assert s.constraint_set == {"distill", "clip"} and s.replay_ratio == 0.4 and s.update_config().replay_count() == 3


def test_naive_settings_switch_everything_off(monkeypatch):
    monkeypatch.setenv("CASCADE_REPLAY_RATIO", "0")
    monkeypatch.setenv("CASCADE_CONSTRAINTS", "none")
    monkeypatch.setenv("CASCADE_GATE", "off")
    s = load_settings()
    cfg = s.update_config()
    assert s.gate is False and cfg.constraints == frozenset() and cfg.replay_count() == 0


def test_toml_file_and_env_precedence(tmp_path, monkeypatch):
    f = tmp_path / "c.toml"
    f.write_text('batch_size = 4\nreduce_keep = 0.5\nconstraints = "replay,clip"\n')
    s = load_settings(f)
    assert (s.batch_size, s.reduce_keep, s.constraint_set) == (4, 0.5, {"clip"})
    monkeypatch.setenv("CASCADE_BATCH_SIZE", "3")
    assert load_settings(f).batch_size == 3
    monkeypatch.setenv("CASCADE_CONFIG", str(f))
    assert load_settings().reduce_keep == 0.5


@pytest.mark.parametrize("name,value", [
    ("CASCADE_REPLAY_RATIO", "1.5"), ("CASCADE_GATE", "maybe"), ("CASCADE_CONSTRAINTS", "replay,magic"),
    ("CASCADE_REDIS_URL", "http://x"), ("CASCADE_BATCH_SIZE", "zero"), ("CASCADE_REDUCE_KEEP", "0"),
    ("CASCADE_METRICS_PORT", "70000"), ("CASCADE_BASE_MODEL", "/nonexistent/dir"), ("CASCADE_DEVICE", "tpu"),
    ("CASCADE_PRECISION", "fp8"), ("CASCADE_LEARNER_GPUS", "-1"), ("CASCADE_CURATION", "exact,magic"),
    ("CASCADE_CURATION_THRESHOLD", "1.5"), ("CASCADE_CURATION_FAIR_SHARE", "0"), ("CASCADE_CURATION_NUM_PERM", "4"),
    ("CASCADE_CURATION_CAPACITY", "0"), ("CASCADE_SKIPPED_MAX_ENTRIES", "0"), ("CASCADE_CURATION_LOSS_LOW", "20"),
    # one switch per idea: distillation and the anchor are switched off in CASCADE_CONSTRAINTS, not by weight 0
    ("CASCADE_DISTILL_WEIGHT", "0"), ("CASCADE_ANCHOR_WEIGHT", "0"), ("CASCADE_REDUCE_REGROW", "1.5"),
])
def test_bad_values_fail_naming_the_setting(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=name):
        load_settings()


def test_unknown_key_in_file_is_named(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("batch_sise = 4\n")
    with pytest.raises(SettingsError, match="CASCADE_BATCH_SISE"):
        load_settings(f)


def test_cli_reports_a_bad_setting_in_one_sentence(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "CASCADE_REPLAY_RATIO": "-1", "CASCADE_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "daemon.cli", "status"], env=env, capture_output=True, text=True)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "CASCADE_REPLAY_RATIO" in lines[0]


def test_device_follows_the_setting_and_what_the_machine_has(monkeypatch):
    import torch

    has_gpu = torch.cuda.is_available()
    assert load_settings().resolved_device() == ("cuda" if has_gpu else "cpu")
    monkeypatch.setenv("CASCADE_DEVICE", "cpu")
    assert load_settings().update_config().device == "cpu"
    monkeypatch.setenv("CASCADE_DEVICE", "cuda:7" if has_gpu else "cuda")
    if not has_gpu or torch.cuda.device_count() <= 7:
        with pytest.raises(SettingsError, match="CASCADE_DEVICE"):
            load_settings()
    # On an existing cluster the GPU may be on another node: the setting is left to Ray's placement.
    monkeypatch.setenv("CASCADE_RAY_ADDRESS", "auto")
    assert load_settings().device.startswith("cuda")


def test_precision_setting_reaches_the_update_step(monkeypatch):
    monkeypatch.setenv("CASCADE_PRECISION", "bf16")
    assert load_settings().update_config().bf16 is True


def test_processes_that_never_load_a_model_never_import_torch(tiny_model, tmp_path):
    """The CLI, the driver and the ingest actor stay light: torch, transformers and peft load only in
    the learner (and in commands that load a model) -- the driver creating a foundation included."""
    code = ("import sys; from pathlib import Path; import daemon.cli, daemon.service, daemon.actors, "
            "daemon.reports, policies.schedule, policies.tuning; from daemon.foundation import ensure_foundation; "
            "from daemon.registry import Registry; "
            f"ensure_foundation(Registry(Path({str(tmp_path)!r})).lineage('main'), Path({str(tiny_model)!r})); "
            f"from daemon.config import Settings; Settings(home=Path({str(tmp_path)!r})).curation_config(); "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
    assert (tmp_path / "main" / "gen-0000" / "card.json").is_file()
    code = "import sys, daemon.lineage; print('torch' in sys.modules and 'peft' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "True"


def test_replay_has_one_switch_and_the_old_spelling_still_reads(monkeypatch):
    # CASCADE_REPLAY_RATIO decides replay; "replay" in CASCADE_CONSTRAINTS is accepted and changes nothing.
    monkeypatch.setenv("CASCADE_CONSTRAINTS", "replay,anchor")
    s = load_settings()
    assert s.constraint_set == {"anchor"} and s.update_config().replay_count() > 0
    monkeypatch.setenv("CASCADE_CONSTRAINTS", "replay")
    assert load_settings().constraints == "none"
    monkeypatch.setenv("CASCADE_REPLAY_RATIO", "0")
    assert load_settings().update_config().replay_count() == 0


def test_every_setting_explains_itself_and_the_docs_follow_the_model():
    from pathlib import Path

    from daemon.config import GROUPS, Settings, configuration_markdown

    for name, f in Settings.model_fields.items():
        assert f.description, f"CASCADE_{name.upper()} has no description"
        assert (f.json_schema_extra or {}).get("group") in GROUPS, f"CASCADE_{name.upper()} has no group"
    doc = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert doc.read_text() == configuration_markdown(), (
        "docs/configuration.md is stale: run python -m daemon.config --markdown > docs/configuration.md")
