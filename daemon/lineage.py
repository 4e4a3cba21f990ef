"""One lineage's learner: the plain-Python object a Ray actor wraps (and tests drive directly).

``LineageWorker`` owns ``registry/<lineage>/``: it turns batches of interactions into constrained
LoRA updates, gates them on held-out data, checkpoints ``live/``, and reduces the lineage into its
next generation (the decisions are ``learners.reduce``'s; here only the registry work). It returns
the entry ids that may be acknowledged only after they are durable.

An update window (one ``learn`` call) goes:

1. drop ids the ledger has already handled (counted as duplicates);
2. curation (``CASCADE_CURATION``, ``learners.curation``): interactions not worth learning (exact or near
   duplicates of recent content, junk, a source over its share) are skipped with their reason, recorded in
   the ledger as ``skipped`` (with their fields, for ``<stream>:skipped``) under the same checkpoint;
3. move a deterministic slice (``heldout_fraction``, by a hash of the id) into the per-source
   held-out sets, which are never trained on (with the gate off too);
4. ``window_steps`` optimizer steps over the rest, each batch topped up with replayed items (the worker
   sizes its windows: ``window_items``, sent back to the driver in every report);
5. the gate compares held-out loss per source with the last accepted adapter; a bad window is
   rolled back (its interactions are still recorded, so they are not retried forever);
6. ledger records the ids under the next checkpoint step, the checkpoint is written and
   ``live`` switched to it, and only then are the entry ids returned for acknowledgement.
"""
from __future__ import annotations

import collections
import logging
import math
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from learners._compat import ensure_torchvision_importable

ensure_torchvision_importable()  # before transformers imports torchvision

from transformers import AutoTokenizer

from daemon.config import Settings
from daemon.heldout import HeldoutLosses
from daemon.registry import LineageDir, Registry, atomic_write_json, generation_card, now_rfc3339, read_json
from daemon.reports import LearnReport, ReductionReport, Snapshot
from daemon.schema import Interaction
from daemon.snapshots import read_candidate, run_reduction, write_snapshot
from learners.curation import Candidate, ContentIndex, Curator
from learners.data import Example, chunks
from learners.export import export_generation
from learners.meta import ReptileConfig, reptile
from learners.merge import merged_copy
from learners.reduce import ReductionData
from learners.reduction import count_parameters
from learners.replay import DeferredQueue, ReplayBuffer
from learners.update import ContinualLearner, evaluate_loss, item_losses, load_causal_lm
from policies.gate import Protection, forgetting, judge_window, stronger
from policies.tuning import Knobs, Signal

log = logging.getLogger("cascade.lineage")


def skip_record(it: Interaction, reason: str, detail: str) -> dict:
    """What the ledger keeps, and the driver copies to ``<stream>:skipped``, for an interaction curation skipped."""
    return {"entry_id": it.entry_id, "id": it.id, "prompt": it.prompt, "response": it.response, "reward": it.reward,
            "meta": it.meta, "lineage": it.lineage, "reason": reason, "detail": detail[:300], "again": False}


def candidate(it: Interaction) -> Candidate:
    """An interaction as curation sees it: its sources are its domain and, where it names one, its producer;
    ``meta.curation`` ``off`` (what ``cascade skipped --replay`` sets) exempts it."""
    producer = it.meta.get("producer")
    sources = (("domain", it.domain),) + ((("producer", producer[:64]),) if isinstance(producer, str) and producer
                                          else ())
    return Candidate(it.id, it.prompt, it.response, it.reward, sources, exempt=it.meta.get("curation") == "off")


def refusal(ex: Example, reason: str, detail: str) -> dict:
    """What the driver copies to the dead-letter stream for an interaction the gate set aside."""
    return {"id": ex.id, "prompt": ex.prompt, "response": ex.response, "reward": ex.reward, "domain": ex.domain,
            "reason": reason, "detail": detail[:300]}


class LineageWorker:
    def __init__(self, settings: Settings, lineage: str) -> None:
        self.s = settings
        self.dir: LineageDir = Registry(settings.registry_root).lineage(lineage)
        self.dir.clean_staging()
        self.lineage = lineage
        self.ledger = self.dir.ledger()
        state = self.dir.live_state() or {}
        self.step = int(state.get("step", 0))
        self.ledger.forget_after(self.step)
        self.counters = dict(state.get("counters", {}))
        for k in ("update_steps", "interactions_learned", "since_reduction", "rollbacks", "heldout_seen",
                  "adapter_steps", "deferred", "refused", "skipped"):
            self.counters.setdefault(k, 0)
        self.schedule = settings.phase_schedule()
        self.tuner = settings.self_tuner()
        if self.tuner is not None and "knobs" in state:  # tuned values survive a restart
            self.tuner.knobs = self.tuner.bounds.clamp(Knobs(**state["knobs"]))
        self.phase = ""
        self.last_entry_id = state.get("last_entry_id")
        self.best: dict[str, float] = dict(state.get("best", {}))
        self.last_heldout: dict[str, float] = dict(state.get("heldout_loss", {}))
        live = self.dir.live_target()
        self.replay = ReplayBuffer(settings.replay_capacity, settings.replay_max_bytes, seed=settings.seed)
        self.heldout: dict[str, list[Example]] = {}
        if live is not None and (live / "replay.json").is_file():
            self.replay = ReplayBuffer.from_json(read_json(live / "replay.json"), settings.replay_capacity,
                                                 settings.replay_max_bytes)
        if live is not None and (live / "heldout.json").is_file():
            self.heldout = {d: [Example.from_json(x) for x in v] for d, v in read_json(live / "heldout.json").items()}
        self.deferred = DeferredQueue(settings.defer_capacity, settings.defer_tries)
        if live is not None and (live / "deferred.json").is_file():
            self.deferred = DeferredQueue.from_json(read_json(live / "deferred.json"), settings.defer_capacity,
                                                    settings.defer_tries)
        self.curator = Curator(settings.curation_config())
        self._reload_curation()
        self._skipped: list[dict] = []  # this window's skip records, written to the ledger with its outcomes
        self.recent: collections.deque[Example] = collections.deque(maxlen=settings.calibration_items)
        self.losses = HeldoutLosses(settings.gate_first_items, settings.gate_exact_every)
        self._changed_domains: set[str] = set()  # held-out sets changed since their best was reset
        # A reduction in the background: its snapshot, and the rows learned since (to relearn on its result).
        pending = state.get("reduction_pending")
        self.pending: Snapshot | None = Snapshot(**pending) if pending else None
        self.since_snapshot: list[Example] = []
        if self.pending is not None and live is not None and (live / "since-snapshot.json").is_file():
            self.since_snapshot = [Example.from_json(x) for x in read_json(live / "since-snapshot.json")]
        self._load_learner(state, live)
        if self.pending is not None and self._adopted(self.pending) is not None:
            # Killed during an adoption, after CURRENT named the new generation: finish it.
            log.info("lineage %s: finishing the adoption of %s after a restart", lineage, self.generation)
            self._start_generation(loaded=True)  # _load_learner found the live adapter on the parent: a fresh one
        elif self.pending is not None and not Path(self.pending.path).is_dir():
            # Its snapshot is gone (a daemon that starts removes them: no reducer works on them any more).
            log.info("lineage %s: the reduction from snapshot %s was abandoned", lineage, self.pending.id)
            self.pending, self.since_snapshot = None, []
            self.checkpoint()

    # -- loading ---------------------------------------------------------------------------------
    def _load_learner(self, state: dict, live: Path | None) -> None:
        self.generation = self.dir.current()
        gen_dir = self.dir.path / self.generation
        self.tokenizer = AutoTokenizer.from_pretrained(str(gen_dir))
        # A live adapter on an older generation was merged into the current one when it was
        # promoted: continue with a fresh adapter on the current generation.
        adapter = live if (live is not None and state.get("base") == self.generation
                           and (live / "adapter_config.json").is_file()) else None
        if adapter is None:
            adapter = self._meta_init(gen_dir)
        self.learner = ContinualLearner(gen_dir, self.tokenizer, self.s.update_config(), adapter_dir=adapter)
        if live is not None and (live / "replay-predictions.safetensors").is_file():
            self.replay.load_predictions(live / "replay-predictions.safetensors", self.generation)
        else:
            self.replay.remember({}, self.generation)
        self.n_params = count_parameters(self.learner.model.get_base_model())

    def _meta_init(self, gen_dir: Path) -> Path | None:
        """A fresh adapter's starting point: meta-learned on every lineage's replay data when the
        policy finds enough of it (``registry/<lineage>/meta-init/<generation>/``), else None."""
        out = self.dir.path / "meta-init" / self.generation
        if (out / "adapter_config.json").is_file():
            return out  # made for this generation before a restart
        items = self.replay.all()
        registry = Registry(self.s.registry_root)
        for name in registry.lineages():
            live = registry.lineage(name).live_target() if name != self.lineage else None
            try:
                if live is not None:
                    items += ReplayBuffer.from_json(read_json(live / "replay.json")).all()
            except (OSError, ValueError, KeyError):  # a lineage mid-checkpoint: its data next time
                continue
        tasks = self.s.meta_init_policy().tasks(items, self.s.seed)
        if tasks is None:
            return None
        log.info("lineage %s: meta-learning a starting adapter on %s", self.lineage,
                 ", ".join(f"{d} ({len(v)})" for d, v in tasks.items()))
        staging = out.parent / f".staging-{self.generation}"
        shutil.rmtree(staging, ignore_errors=True)
        reptile(gen_dir, self.tokenizer, tasks, self.s.update_config(),
                ReptileConfig(rounds=self.s.meta_rounds, inner_steps=self.s.meta_inner_steps), staging)
        atomic_write_json(staging / "tasks.json", {d: len(v) for d, v in tasks.items()})
        for old in out.parent.iterdir():  # one generation's initialization is kept
            if old != staging:
                shutil.rmtree(old, ignore_errors=True)
        staging.rename(out)
        return out

    # -- learning --------------------------------------------------------------------------------
    def _is_heldout(self, ex: Example) -> bool:
        return (ex.stable_hash() % 1_000_000) < self.s.heldout_fraction * 1_000_000

    def _add_heldout(self, ex: Example) -> None:
        bucket = self.heldout.setdefault(ex.domain, [])
        self.counters["heldout_seen"] += 1
        if len(bucket) < self.s.heldout_per_domain:
            bucket.append(ex)
            j = len(bucket) - 1
        else:  # reservoir over this source's held-out items
            j = ex.stable_hash() % self.counters["heldout_seen"]
            if j < len(bucket):
                bucket[j] = ex
            else:
                return
        self.losses.changed(ex.domain, j)
        self._changed_domains.add(ex.domain)

    def new_per_step(self) -> int:
        """New rows in a batch of ``batch_size`` at the replay ratio in force (phase and self-tuning included)."""
        return self.learner.config.new_per_step()

    def window_items(self) -> int:
        """New interactions the next window wants: ``window_steps`` full batches at the replay ratio in force.
        The worker owns this number: the driver asks it before the first window (the actor's
        ``window_items``) and reads it from every :class:`LearnReport` (``window``) after."""
        self._configure_window()
        return self.new_per_step() * self.s.window_steps

    def learn(self, interactions: Sequence[Interaction]) -> LearnReport:
        try:
            return self._learn(interactions)
        except BaseException:
            # Nothing of this window became durable; the driver sends it again. The curation index took in
            # what this window would have learned: back to the checkpoint's, or the retry would find every
            # interaction a duplicate of itself.
            self._skipped = []
            self._reload_curation()
            raise

    def _reload_curation(self) -> None:
        cfg, live = self.curator.cfg, self.dir.live_target()
        self.curator.index = (ContentIndex.load(live, cfg.capacity, cfg.num_perm, cfg.threshold, cfg.shingle_words)
                              if live is not None
                              else ContentIndex(cfg.capacity, cfg.num_perm, cfg.threshold, cfg.shingle_words))

    def _learn(self, interactions: Sequence[Interaction]) -> LearnReport:
        t0 = time.perf_counter()
        rep = LearnReport(lineage=self.lineage, ack=[i.entry_id for i in interactions])
        seen = self.ledger.seen(i.id for i in interactions)
        fresh: list[Interaction] = []
        redelivered: dict[str, str] = {}
        for it in interactions:
            if it.id in seen:
                rep.duplicates += 1
                redelivered[it.id] = it.entry_id
            else:
                seen.add(it.id)
                fresh.append(it)
        if redelivered:
            rep.skipped += self._skipped_again(redelivered)
        if not fresh:
            return self._finish(rep, t0)

        train: list[Example] = []
        outcomes: list[tuple[str, str]] = []
        with rep.seconds("curate"):
            fresh = self._curate(fresh, rep, outcomes)
        for it in fresh:
            ex = it.example()
            if self._is_heldout(ex):  # with the gate off too: the reduction judges itself on these
                self._add_heldout(ex)
                outcomes.append((ex.id, "heldout"))
                rep.heldout_added += 1
            else:
                train.append(ex)

        if train:
            # Interactions an earlier window deferred are tried again beside the new ones.
            retried = self.deferred.take(self.new_per_step())
            rows = [ex for ex, _ in retried] + train
            self._configure_window(rep)
            decision, new_tokens, kept_steps, predictions, rows = self._learn_window(rows, rep, len(retried))
            if len(rows) < len(retried) + len(train):  # the deferred rows were dropped from the window's tries
                self._requeue(retried, outcomes, rep, decision)
                retried = []
            if decision is None or decision.accept:
                self.learner.accept()
                self.replay.remember(predictions, self.generation)
                if self.learner.config.replay_count():
                    self.replay.extend([ex for ex in rows if ex.reward > 0])
                self.recent.extend(rows)
                if self.pending is not None:  # to relearn on the reduction's result (at most the newest
                    # replay_capacity rows: the rest are in the replay store)
                    self.since_snapshot = (self.since_snapshot + rows)[-self.s.replay_capacity:]
                outcomes += [(ex.id, "learned") for ex in rows]
                rep.learned, rep.redeemed = len(rows), len(retried)
                rep.learned_tokens = new_tokens
                self.counters["interactions_learned"] += len(rows)
                self.counters["since_reduction"] += len(rows)
                self.counters["adapter_steps"] += kept_steps
            elif decision.verdict == "harmful":
                # Content that harms what the lineage keeps is set aside with its reason; interactions that
                # were only waiting for room go back to wait (one try older).
                rep.refused = [refusal(ex, "harmful", decision.detail) for ex in train]
                outcomes += [(ex.id, "refused") for ex in train]
                self._requeue(retried, outcomes, rep, decision)
            else:
                # Learnable but too costly now: kept (durably, with the checkpoint) to be tried again.
                self._requeue([(ex, 0) for ex in train] + retried, outcomes, rep, decision)
                waiting = set(self.deferred.ids())
                rep.deferred = sum(1 for ex in train if ex.id in waiting)
            self.counters["update_steps"] += rep.steps
            if self.tuner is not None:
                arriving = {ex.domain: self.last_heldout.get(ex.domain, math.nan) for ex in rows}
                rep.tuning = self.tuner.observe(Signal(forgetting(self.last_heldout, self.best),
                                                       rep.rollback is not None, arriving))
                for c in rep.tuning:
                    log.info("lineage %s: self-tuning %s %.4g -> %.4g: %s", self.lineage, c.knob, c.old, c.new, c.reason)
        self.counters["deferred"] += rep.deferred
        self.counters["refused"] += len(rep.refused)
        self.counters["skipped"] += len(self._skipped)
        self.last_entry_id = interactions[-1].entry_id
        with rep.seconds("checkpoint"):
            self.checkpoint(outcomes)
        return self._finish(rep, t0)

    def _curate(self, fresh: list[Interaction], rep: LearnReport, outcomes: list[tuple[str, str]]) -> list[Interaction]:
        """The interactions of ``fresh`` worth learning; the others go into ``rep.skipped`` and ``outcomes``
        (``skipped``), their records into the ledger with the checkpoint (:meth:`checkpoint`)."""
        self._skipped = []
        if not self.curator.enabled:
            return fresh
        losses = self._response_losses(fresh) if "loss" in self.curator.cfg.decisions else None
        kept = []
        for it, skip in zip(fresh, self.curator.curate([candidate(it) for it in fresh], losses)):
            if skip is None:
                kept.append(it)
                continue
            self._skipped.append(skip_record(it, skip.reason, skip.detail))
            outcomes.append((it.id, "skipped"))
        rep.skipped += self._skipped
        return kept

    def _response_losses(self, items: list[Interaction]) -> list[float]:
        """The live model's mean loss on each response (nats/token; NaN where no token carries loss)."""
        nll, tokens = item_losses(self.learner.model, self.tokenizer, [it.example() for it in items],
                                  self.s.max_seq_len, self.s.batch_size, self.s.precision == "bf16")
        return [n / t if t else math.nan for n, t in zip(nll, tokens)]

    def _skipped_again(self, redelivered: dict[str, str]) -> list[dict]:
        """Skip records of entries delivered again after a crash (the same entry id: the daemon died between
        the skip becoming durable and its acknowledgement), so the driver copies them to ``<stream>:skipped``
        again before acknowledging. A producer re-sending an id (another entry id) is only a duplicate."""
        again = []
        for x in self.ledger.skipped(redelivered):
            if x.get("entry_id") == redelivered[x["id"]]:
                again.append({**x, "again": True})
        return again

    def _learn_window(self, rows: list[Example], rep: LearnReport, n_deferred: int = 0):
        """Optimizer steps over ``rows`` (each batch topped up with replayed items), judged by the gate;
        a refused window that may be learned more carefully is tried again under stronger protection
        (up to ``gate_retries`` times), and without its first ``n_deferred`` rows (interactions an earlier
        window deferred: the likelier cause, and new traffic must not wait behind them). Returns the last
        decision (None with the gate off), the new rows' tokens, the steps of the last try, its predictions
        on the replayed rows (for the replay store to keep if the window is accepted) and the rows it
        learned; the adapter is left as learned (accepted) or rolled back."""
        with rep.seconds("gate_before"):
            if self.s.gate:
                n0 = self.losses.items_measured
                self._measure_before()
                rep.gate_items += self.losses.items_measured - n0
        # Never more than window_steps steps: a window bigger than this phase wants (sized before the
        # phase or the tuner changed the replay ratio, or with deferred rows beside the new ones) spreads
        # its rows and replays less.
        per_step, n_replay = self._step_sizes(len(rows))
        base = self.learner.config.learning_rate, self.learner.config.distill_weight
        protection, decision, steps = Protection(), None, 0
        for attempt in range(self.s.gate_retries + 1):
            steps = 0
            self.learner.configure(learning_rate=base[0] * protection.lr_factor,
                                   distill_weight=base[1] * protection.distill_factor)
            losses, new_tokens, predictions = [], 0, {}
            for part in chunks(rows, per_step):
                with rep.seconds("replay"):
                    replayed = self.replay.sample(n_replay, protection.prefer)
                    stored = [self.replay.prediction(ex) for ex in replayed]
                r = self.learner.step(part, replayed, stored)
                rep.seconds.add(r.seconds, "step.")
                predictions.update({i: p for i, p in r.predictions.items()
                                    if i not in predictions or p.nll < predictions[i].nll})
                losses.append(r.task_loss)
                steps += 1
                rep.steps += 1
                rep.tokens += r.tokens
                new_tokens += r.new_tokens
            rep.train_loss = sum(losses) / len(losses)
            if not self.s.gate:
                break
            sets = self.heldout_items
            judged = {d for d in sets if len(sets[d]) >= self.s.gate_min_items}
            budgets = dict(total_budget=self.s.gate_total_budget, harm_budget=self.s.gate_step_budget,
                           z=self.s.gate_noise_z)
            with rep.seconds("gate_after"):
                n0 = self.losses.items_measured
                measured, pending = self.losses.measure_window(sets, self._measure_items, self._measure_accepted,
                                                               judged, {ex.domain for ex in rows}, self.best,
                                                               **budgets)
                rep.gate_items += self.losses.items_measured - n0
            decision = judge_window(measured, {ex.domain for ex in rows}, self.best, **budgets)
            rep.attempts = attempt + 1
            if decision.accept:
                # Estimated levels count for the best too: a best that waited for an exact level would measure
                # the bound from a loss the source has long left; an estimate's noise lowers a minimum only a
                # little (a share's standard error), and only ever makes the bound stricter.
                for d, level in self.losses.accept(pending).items():
                    self.last_heldout[d] = level
                    self.best[d] = min(level, self.best.get(d, math.inf))
                break
            self.learner.rollback()
            self.counters["rollbacks"] += 1
            rep.rollbacks.append(decision.reason)
            rep.rollback = rep.rollback or decision.reason
            log.warning("lineage %s: window refused (%s, try %d of %d): %s", self.lineage, decision.verdict,
                        attempt + 1, self.s.gate_retries + 1, decision.detail)
            # A NaN is harmful at once. A large one-window rise is harmful only if the window still does it when
            # learned more carefully: a legitimate new topic's first windows can move an old source far (0.36-0.43
            # nats measured on the unlike suite) and, learned at a lower rate, do not; a poisoned burst still does.
            if decision.verdict == "harmful" and decision.reason == "nonfinite":
                break
            protection = stronger(protection, decision.hurt)
            if n_deferred and len(rows) > n_deferred:
                rows, n_deferred = rows[n_deferred:], 0
                per_step, n_replay = self._step_sizes(len(rows))
        self.learner.configure(learning_rate=base[0], distill_weight=base[1])
        return decision, new_tokens, steps, predictions, rows

    def _step_sizes(self, n_rows: int) -> tuple[int, int]:
        """New rows and replayed rows per step for a window of ``n_rows``: never more than window_steps steps."""
        n_steps = min(self.s.window_steps, math.ceil(n_rows / self.new_per_step()))
        per_step = math.ceil(n_rows / n_steps)
        return per_step, min(self.learner.config.replay_count(), max(0, self.s.batch_size - per_step))

    def _requeue(self, items: list[tuple[Example, int]], outcomes: list[tuple[str, str]], rep: LearnReport,
                 decision) -> None:
        """Defer ``items`` one try older; those out of tries are refused, those pushed out of the bounded
        queue stay in the replay store (learned as replay from then on)."""
        exhausted, overflow = self.deferred.put_back(items)
        waiting = set(self.deferred.ids())
        outcomes += [(ex.id, "deferred") for ex, _ in items if ex.id in waiting]
        detail = f"not learnable within the forgetting bound in {self.s.defer_tries} windows: {decision.detail}"
        rep.refused += [refusal(ex, "unlearnable", detail) for ex in exhausted]
        outcomes += [(ex.id, "refused") for ex in exhausted]
        self.replay.extend([ex for ex in overflow if ex.reward > 0])
        outcomes += [(ex.id, "replayed") for ex in overflow]
        rep.replayed += len(overflow)

    @property
    def heldout_items(self) -> dict[str, list[Example]]:
        return {d: v for d, v in sorted(self.heldout.items()) if v}

    def _measure_items(self, examples: Sequence[Example]) -> tuple[list[float], list[int]]:
        return item_losses(self.learner.model, self.tokenizer, examples, self.s.max_seq_len, self.s.batch_size,
                           self.s.precision == "bf16")

    def _measure_accepted(self, examples: Sequence[Example]) -> tuple[list[float], list[int]]:
        with self.learner.accepted_weights():
            return self._measure_items(examples)

    def _measure_before(self) -> None:
        """The accepted adapter's held-out losses, measured where a held-out set is new or changed (a
        source's best so far was a number about other items and is reset with it)."""
        for d in self.losses.refresh(self.heldout_items, self._measure_items):
            v = self.last_heldout[d] = self.losses.sources[d].level
            self.best[d] = v if d in self._changed_domains else min(v, self.best.get(d, math.inf))
            self._changed_domains.discard(d)

    def learn_all(self, interactions: Sequence[Interaction]) -> list[LearnReport]:
        """``interactions`` in windows of the size this worker asks for, as the driver sends them."""
        reports, i = [], 0
        while i < len(interactions):
            n = self.window_items()
            reports.append(self.learn(interactions[i : i + n]))
            i += n
        return reports

    def knobs(self) -> Knobs:
        """The learning rate, replay ratio and distillation weight before the phase adjusts them."""
        if self.tuner is not None:
            return self.tuner.knobs
        return Knobs(self.s.learning_rate, self.s.replay_ratio, self.s.distill_weight)

    def _configure_window(self, rep: LearnReport | None = None) -> None:
        """Set the learner up for this window: the phase in force, then the (tuned) knobs."""
        _, phase = self.schedule.at(self.counters["adapter_steps"])
        if phase.name != self.phase:
            log.info("lineage %s: phase %s from adapter step %d", self.lineage, phase.name,
                     self.counters["adapter_steps"])
            self.phase = phase.name
        k = self.knobs()
        self.learner.configure(learning_rate=k.learning_rate * phase.lr_scale,
                               replay_ratio=k.replay_ratio if phase.replay_ratio is None else phase.replay_ratio,
                               distill_weight=k.distill_weight, modules=phase.modules)
        if rep is not None:
            cfg = self.learner.config
            rep.phase = phase.name
            rep.knobs = {"learning_rate": cfg.learning_rate, "replay_ratio": cfg.replay_ratio,
                         "distill_weight": cfg.distill_weight}

    def _finish(self, rep: LearnReport, t0: float) -> LearnReport:
        rep.heldout = dict(self.last_heldout)
        rep.forgetting = forgetting(self.last_heldout, self.best)
        rep.source_forgetting = self.source_forgetting()
        rep.deferred_waiting = len(self.deferred)
        rep.replay_items = len(self.replay)
        rep.update_seconds = time.perf_counter() - t0
        rep.reduce_due = self.s.reduction_policy().due(self.counters["since_reduction"])
        rep.window = self.window_items()
        return rep

    # -- durability ------------------------------------------------------------------------------
    def checkpoint(self, outcomes: Sequence[tuple[str, str]] = ()) -> None:
        """Record ``outcomes`` under the next step, write the checkpoint, then switch ``live`` to it."""
        self.step += 1
        if outcomes:
            self.ledger.record(outcomes, self.step, self._skipped, keep_skipped=self.s.skipped_max_entries)
        self._skipped = []
        ckpt = self.dir.new_checkpoint_dir(self.step)
        try:
            self.learner.save(ckpt)
            atomic_write_json(ckpt / "curation.json", self.curator.index.save(ckpt))
            atomic_write_json(ckpt / "replay.json", self.replay.to_json())
            self.replay.save_predictions(ckpt / "replay-predictions.safetensors")
            atomic_write_json(ckpt / "heldout.json", {d: [e.to_json() for e in v] for d, v in self.heldout.items()})
            atomic_write_json(ckpt / "deferred.json", self.deferred.to_json())
            if self.pending is not None:
                atomic_write_json(ckpt / "since-snapshot.json", [e.to_json() for e in self.since_snapshot])
            atomic_write_json(ckpt / "state.json", self.state())
            self.dir.publish_live(ckpt)
        except BaseException:
            shutil.rmtree(ckpt, ignore_errors=True)
            raise

    def state(self) -> dict:
        return {
            "lineage": self.lineage,
            "base": self.generation,
            "step": self.step,
            "update_steps": self.counters["update_steps"],
            "interactions_learned": self.counters["interactions_learned"],
            "last_entry_id": self.last_entry_id,
            "counters": self.counters,
            "best": self.best,
            "heldout_loss": self.last_heldout,
            "source_forgetting": self.source_forgetting(),
            "forgetting_bound": self.s.gate_total_budget,
            "deferred_waiting": len(self.deferred),
            "phase": self.phase,
            "knobs": vars(self.knobs()),
            "reduction_pending": None if self.pending is None else vars(self.pending),
            "updated_at": now_rfc3339(),
        }

    def source_forgetting(self) -> dict[str, float]:
        """Per held-out source: how far its loss sits above the best this lineage reached on it."""
        return {d: max(0.0, v - self.best[d]) for d, v in self.last_heldout.items() if d in self.best}

    def status(self) -> dict:
        return {"lineage": self.lineage, "generation": self.generation, "n_params": self.n_params,
                "step": self.step, "replay_items": len(self.replay), "heldout": self.last_heldout,
                "curation_items": len(self.curator.index),
                **self.counters}

    # -- reduction -------------------------------------------------------------------------------
    def reduction_data(self) -> ReductionData:
        """What this lineage reduces on: the latest ``calibration_items`` of its replay + recent data for
        importance and reconstruction, all of it for healing (and the vocabulary), its held-out sets as gate."""
        both = self.replay.all() + list(self.recent)
        calib = both[-self.s.calibration_items:]
        heal_items = list({ex.id: ex for ex in both}.values())  # recent items are usually in replay too
        gate = {d: v for d, v in self.heldout.items() if v} or {"calibration": calib}
        return ReductionData(calib, heal_items, gate, vocabulary=both if self.s.reduce_vocab else None)

    def reduce(self, trigger: str = "command") -> ReductionReport:
        """A whole reduction in this process: :meth:`snapshot`, the reducer's :func:`run_reduction`, then
        :meth:`finish_reduction`. The daemon runs the middle part in its reducer actor while this worker
        goes on learning; tests and benchmarks call this."""
        snap = self.snapshot(trigger)
        if isinstance(snap, ReductionReport):
            return snap
        return self.finish_reduction(snap, run_reduction(snap, self.s))

    def snapshot(self, trigger: str) -> Snapshot | ReductionReport:
        """Write what a reduction works on (the generation with the accepted adapter merged in, and
        :meth:`reduction_data`) for the reducer, and from now on keep the rows this worker learns, to relearn
        them on the new generation. A rejected report when there is nothing to calibrate on yet."""
        data = self.reduction_data()
        if not data.calibration:
            return ReductionReport(self.lineage, "rejected", self.generation, self.generation, self.n_params,
                                   self.n_params, 0.0, detail="no interactions to calibrate on yet")
        log.info("lineage %s: reducing %s (trigger %s) in the background from step %d", self.lineage,
                 self.generation, trigger, self.step)
        gen_dir, live = self.dir.path / self.generation, self.dir.live_target()
        teacher = load_causal_lm(gen_dir)
        adapted = live is not None and (live / "adapter_config.json").is_file()
        if adapted and self.dir.live_state()["base"] == self.generation:
            teacher = merged_copy(teacher, live)  # the accepted adapter: what the last checkpoint holds
        snap = write_snapshot(self.s, self.lineage, teacher, self.tokenizer, data, parent=self.generation,
                              trigger=trigger, step=self.step, n_params=self.n_params)
        del teacher
        self.pending, self.since_snapshot = snap, []
        self.counters["since_reduction"] = 0
        self.checkpoint()  # the pending snapshot is durable: a restart still relearns what follows it
        return snap

    def finish_reduction(self, snap: Snapshot, result: ReductionReport) -> ReductionReport:
        """The reducer's answer for ``snap``: adopt its candidate as the next generation (and relearn on it
        what was learned since the snapshot), or go on with the current one. The outcome for the driver."""
        t0 = time.perf_counter()
        if self.pending is None or self.pending.id != snap.id:
            done = self._adopted(snap)
            if done is not None:  # adopted by the restart that followed a crash during the adoption
                return done
            shutil.rmtree(snap.path, ignore_errors=True)
            return ReductionReport(self.lineage, "rejected", self.generation, self.generation, self.n_params,
                                   self.n_params, result.seconds, detail=f"snapshot {snap.id} is no longer awaited")
        candidate = read_candidate(snap) if result.outcome == "candidate" else None
        if candidate is None:
            self.pending, self.since_snapshot = None, []
            self.checkpoint()
            shutil.rmtree(snap.path, ignore_errors=True)
            return replace(result, outcome="failed" if result.outcome == "failed" else "rejected",
                           detail=result.detail or "the reducer wrote no candidate")
        folder, record = candidate
        gen, parent = self.dir.next_gen(), self.generation
        card = generation_card(self.lineage, int(gen.split("-")[1]), f"{self.lineage}/{parent}",
                               record["n_params"], self.counters["interactions_learned"], record["reduction"],
                               record["evals"])
        staging = self.dir.staging_dir()
        try:
            for f in folder.iterdir():  # linked where the filesystem allows: the candidate is never written again
                if f.name != "reduction.json":
                    try:
                        os.link(f, staging / f.name)
                    except OSError:
                        shutil.copy2(f, staging / f.name)
            card["exports"], export_failures = self._export(staging, gen)
            self.dir.publish_generation(staging, gen, card)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.dir.set_current(gen)  # from here a restart finishes the adoption (see __init__)
        n_before = self.n_params
        self._start_generation()
        shutil.rmtree(snap.path, ignore_errors=True)
        log.info("lineage %s: promoted %s (%d -> %d parameters)", self.lineage, gen, n_before, self.n_params)
        return ReductionReport(self.lineage, "promoted", gen, parent, n_before, self.n_params,
                               result.seconds + time.perf_counter() - t0, card=card, export_failures=export_failures)

    def _adopted(self, snap: Snapshot) -> ReductionReport | None:
        """The promoted report of ``snap`` when the current generation came from it, else None."""
        card = self.dir.card(self.generation)
        if (card.get("reduction") or {}).get("snapshot", {}).get("id") != snap.id:
            return None
        return ReductionReport(self.lineage, "promoted", self.generation, snap.parent, snap.n_params,
                               card["n_params"], 0.0, card=card)

    def _start_generation(self, loaded: bool = False) -> None:
        """Go on from the current generation (just adopted): a fresh adapter (already ``loaded`` on it, or
        loaded now), the gate's references reset, and the rows learned since the snapshot learned again on
        it; then checkpoint."""
        rows, self.pending, self.since_snapshot = self.since_snapshot, None, []
        if not loaded:
            self._load_learner({}, None)
        self.counters["adapter_steps"] = 0  # a fresh adapter: the phase schedule starts again
        self.best, self.last_heldout = {}, {}
        self.losses = HeldoutLosses(self.s.gate_first_items, self.s.gate_exact_every)
        self._relearn(rows)
        self.checkpoint()

    def _relearn(self, rows: list[Example]) -> None:
        """Learn ``rows`` again on the fresh adapter, batches topped up with replay as usual. Their ids are in
        the ledger already: nothing is recorded or counted as learned twice, only the steps are counted."""
        if not rows:
            return
        self._configure_window()
        log.info("lineage %s: relearning on %s the %d interactions learned during the reduction", self.lineage,
                 self.generation, len(rows))
        per_step = self.new_per_step()
        for part in chunks(rows, per_step):
            replayed = self.replay.sample(self.learner.config.replay_count())
            self.learner.step(part, replayed, [self.replay.prediction(ex) for ex in replayed])
            self.counters["update_steps"] += 1
            self.counters["adapter_steps"] += 1
        self.learner.accept()

    def _export(self, staging: Path, gen: str) -> tuple[list[dict], list[str]]:
        """CASCADE_EXPORT's files of the generation being built, inside it (so they are published with it):
        the card's ``exports`` and one sentence per failure. A failure never stops the promotion."""
        targets = self.s.export_targets()
        if not targets:
            return [], []
        records, failures = export_generation(staging, self.lineage, gen, targets)
        for f in failures:
            log.error("lineage %s: exporting %s failed (the generation is promoted without it): %s",
                      self.lineage, gen, f)
        return [r.to_json() for r in records], failures

    def close(self) -> None:
        self.ledger.close()
