"""Shared fixtures: a tiny Llama on disk, a real Redis (one database per test), daemon subprocesses."""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from bench.common import free_port  # noqa: F401  (the tests take their ports from here)
from tests.tiny import build_tiny_llama, save_tokenizer

ROOT = Path(__file__).resolve().parents[1]
REDIS_HOST = os.environ.get("CASCADE_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("CASCADE_TEST_REDIS_PORT", "6379"))
_db = itertools.count(1)

# The unit tier (`make test-fast`, `pytest -m unit`): modules that start no Ray and no daemon process.
# A new module is in the whole suite only until it is listed here.
UNIT_MODULES = {"test_config", "test_schema", "test_replay", "test_learners", "test_reduction", "test_vocab",
                "test_registry", "test_phases_and_tuning", "test_meta_init", "test_stream", "test_foundation",
                "test_gate", "test_environment", "test_bench_common", "test_serving_units", "test_curation"}


# Unit tests that took 8 s or more (`--durations`, on the shared 2 cores): in `make test`, not in `make test-fast`.
SLOW_UNITS = {
    "test_config::test_processes_that_never_load_a_model_never_import_torch",
    "test_curation::test_the_worker_skips_with_reasons_durably_and_keeps_the_index_across_a_restart",
    "test_environment::test_a_plain_script_imports_transformers_and_peft_and_loads_a_generation",
    "test_foundation::test_gguf_is_converted_once_into_a_standard_gen_0000",
    "test_gate::test_a_poisoned_burst_is_refused_as_harmful_and_set_aside",
    "test_phases_and_tuning::test_a_lineage_tunes_itself_after_a_rollback_and_keeps_the_tuned_values",
    "test_reduction::test_healing_by_distillation_closes_part_of_the_gap",
    "test_reduction::test_least_squares_refit_and_reconstruction_make_up_for_what_was_pruned",
    "test_reduction::test_reconstructing_an_unpruned_copy_changes_nothing",
    "test_reduction::test_regrown_units_are_fresh_write_nothing_yet_and_can_be_learned",
    "test_reduction::test_the_reducer_backs_off_to_larger_keeps_and_gives_up_after_the_last",
    "test_reduction::test_the_reducer_keeps_refit_and_reconstruction_only_where_the_gate_sets_agree",
    "test_registry::test_a_background_reduction_carries_over_what_was_learned_meanwhile",
    "test_registry::test_a_kill_during_the_adoption_is_finished_by_the_restart",
    "test_registry::test_a_reduction_the_reducer_could_not_finish_leaves_the_learner_as_it_was",
    "test_registry::test_crash_between_generation_write_and_current_switch",
    "test_registry::test_failed_reduction_gate_leaves_current_untouched",
    "test_registry::test_gate_does_not_judge_sources_with_too_few_heldout_items",
    "test_registry::test_reduction_trims_the_vocabulary_and_learning_goes_on",
    "test_serving_units::test_a_new_versions_batch_starts_beside_the_old_one_instead_of_after_it",
    "test_serving_units::test_a_request_joins_its_versions_running_batch_instead_of_waiting_for_it",
    "test_stream::test_embedded_redis_62_persists_and_reports_lag",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "unit: the fast tier, no Ray or daemon processes (make test-fast)")
    config.addinivalue_line("markers", "slow: a unit test of 8 s or more (make test runs it, make test-fast not)")


def pytest_collection_modifyitems(items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in UNIT_MODULES:
            item.add_marker(pytest.mark.unit)
        if f"{module}::{item.originalname}" in SLOW_UNITS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return save_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer_dir) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir)


@pytest.fixture
def redis_url() -> str:
    """A real Redis database of its own, flushed (``make test`` starts the server)."""
    db = 1 + (next(_db) - 1) % 15
    r = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
    try:
        r.ping()
    except redis.ConnectionError:
        pytest.fail(f"no Redis on {REDIS_HOST}:{REDIS_PORT}: run the tests with `make test`, which starts one")
    r.flushdb()
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"


def settings_env(home: Path, base: Path, redis_url: str, **extra) -> dict[str, str]:
    """Environment for a daemon/CLI subprocess on the tiny model, tuned so tests run in seconds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
    # The checkout under test first on the path, for the daemon and for its Ray workers too (they
    # would otherwise import the package from wherever it is installed editable).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update({
        "CASCADE_HOME": str(home), "CASCADE_BASE_MODEL": str(base), "CASCADE_REDIS_URL": redis_url,
        "CASCADE_METRICS_PORT": str(free_port()), "CASCADE_MAX_SEQ_LEN": "48", "CASCADE_BATCH_SIZE": "8",
        "CASCADE_LEARNING_RATE": "0.003", "CASCADE_REDUCE_EVERY": "0", "CASCADE_HEAL_STEPS": "4",
        "CASCADE_REDUCE_BUDGET": "3.0", "CASCADE_CLAIM_IDLE_MS": "2000", "CASCADE_READ_BLOCK_MS": "200",
        "CASCADE_SERVE": "off",  # the API only where a test asks for it (serve="on", on a free port)
        # The fate-counting tests' catalog items ("Item i has colour c and weight w kg.") are at most 0.6 (word
        # 3-grams) or 0.64 (word pairs, the default) Jaccard apart by construction; at 0.7 with 3-grams, MinHash's
        # noise (128 permutations) skipped 3 of 200 as near duplicates. These tests count learned + held out;
        # they run at 0.8, where none is skipped.
        "CASCADE_CURATION_THRESHOLD": "0.8",
    })
    env.update({f"CASCADE_{k.upper()}": str(v) for k, v in extra.items()})
    return env


class DaemonProcess:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run"], env=env,
                                     stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        self.port = int(env["CASCADE_METRICS_PORT"])

    def wait_healthy(self, timeout: float = 120) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"daemon not healthy after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return r.read().decode()

    def terminate(self, timeout: float = 180) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def daemon_factory(tmp_path):
    started: list[DaemonProcess] = []

    def start(env: dict[str, str]) -> DaemonProcess:
        d = DaemonProcess(env, tmp_path / f"daemon-{len(started)}.log")
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


def metric_value(text: str, name: str, default: float | None = None, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``; ``default`` when there is none
    (a labelled series exists only once it is first set), else ``KeyError``."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, lab = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in lab for k, v in labels.items()):
            total += float(value)
            found = True
    if not found:
        if default is not None:
            return default
        raise KeyError(f"{name}{labels} not in /metrics")
    return total


def wait_drained(r: redis.Redis, stream: str, group: str, timeout: float = 240, proc: DaemonProcess | None = None) -> None:
    from daemon.stream import group_info

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = group_info(r, stream, group)
        if info.lag == 0 and info.pending == 0 and info.length > 0:
            return
        if proc is not None and proc.proc.poll() is not None:
            raise AssertionError(f"daemon exited:\n{proc.log.read_text()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"stream not drained after {timeout}s: {group_info(r, stream, group)}")
