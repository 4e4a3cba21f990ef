"""One lineage's learner: the plain-Python object a Ray actor wraps (and tests drive directly).

``LineageWorker`` owns ``registry/<lineage>/``: it turns batches of interactions into constrained
LoRA updates, gates them on held-out data, checkpoints ``live/``, and reduces the lineage into its
next generation. It returns the entry ids that may be acknowledged only after they are durable.

An update window (one ``learn`` call) goes:

1. drop ids the ledger has already handled (counted as duplicates);
2. move a deterministic slice (``heldout_fraction``, by a hash of the id) into the per-source
   held-out sets, which are never trained on;
3. optimizer steps over the rest, each batch topped up with replayed items;
4. the gate compares held-out loss per source with the last accepted adapter; a bad window is
   rolled back (its interactions are still recorded, so they are not retried forever);
5. ledger records the ids under the next checkpoint step, the checkpoint is written and
   ``live`` switched to it, and only then are the entry ids returned for acknowledgement.
"""
from __future__ import annotations

import collections
import logging
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from learners._compat import ensure_torchvision_importable

ensure_torchvision_importable()  # before transformers imports torchvision

from transformers import AutoTokenizer

from daemon.config import Settings
from daemon.registry import LineageDir, Registry, now_rfc3339, read_json, atomic_write_json
from daemon.reports import LearnReport, ReductionReport
from daemon.schema import Interaction
from learners.data import Example, chunks
from learners.export import export_generation
from learners.meta import ReptileConfig, reptile
from learners.reduction import (activation_importance, count_parameters, heal, kept_blocks, merge_adapter, prune,
                               reconstruct)
from learners.replay import ReplayBuffer
from learners.update import ContinualLearner, evaluate_loss
from learners.vocab import kept_token_ids, token_counts, trim_vocabulary
from policies.gate import forgetting, judge_update
from policies.reduction import ModelShape, plan_candidates
from policies.tuning import Knobs, Signal

log = logging.getLogger("cascade.lineage")


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
                  "adapter_steps"):
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
        self.recent: collections.deque[Example] = collections.deque(maxlen=settings.calibration_items)
        self._heldout_dirty = True
        self._changed_domains: set[str] = set()
        self._load_learner(state, live)

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
        else:  # reservoir over this source's held-out items
            j = ex.stable_hash() % self.counters["heldout_seen"]
            if j < len(bucket):
                bucket[j] = ex
            else:
                return
        self._heldout_dirty = True
        self._changed_domains.add(ex.domain)

    def heldout_losses(self, model=None) -> dict[str, float]:
        model = model if model is not None else self.learner.model
        return {d: evaluate_loss(model, self.tokenizer, v, self.s.max_seq_len, self.s.batch_size,
                                 self.s.precision == "bf16") for d, v in sorted(self.heldout.items()) if v}

    def new_per_step(self) -> int:
        return max(1, self.s.batch_size - self.learner.config.replay_count())

    def learn(self, interactions: Sequence[Interaction]) -> LearnReport:
        t0 = time.perf_counter()
        rep = LearnReport(lineage=self.lineage, ack=[i.entry_id for i in interactions], received=len(interactions))
        seen = self.ledger.seen(i.id for i in interactions)
        fresh: list[Interaction] = []
        for it in interactions:
            if it.id in seen:
                rep.duplicates += 1
            else:
                seen.add(it.id)
                fresh.append(it)
        if not fresh:
            return self._finish(rep, t0)

        train: list[Example] = []
        outcomes: list[tuple[str, str]] = []
        for it in fresh:
            ex = it.example()
            if self.s.gate and self._is_heldout(ex):
                self._add_heldout(ex)
                outcomes.append((ex.id, "heldout"))
                rep.heldout_added += 1
            else:
                train.append(ex)

        if train:
            self._configure_window(rep)
            before = self.last_heldout
            if self.s.gate and self._heldout_dirty:
                # A source whose held-out set changed is measured afresh: its best so far was a
                # number about other items and cannot be compared with the new ones.
                before = self.heldout_losses()
                for d, v in before.items():
                    self.best[d] = v if d in self._changed_domains else min(v, self.best.get(d, math.inf))
                self._heldout_dirty = False
                self._changed_domains.clear()
            losses, n_replay, new_tokens = [], self.learner.config.replay_count(), 0
            for part in chunks(train, self.new_per_step()):
                r = self.learner.step(part, self.replay.sample(n_replay))
                losses.append(r.task_loss)
                rep.steps += 1
                rep.tokens += r.tokens
                new_tokens += r.new_tokens
            rep.train_loss = sum(losses) / len(losses)
            if self.s.gate:
                after = self.heldout_losses()
                # Sources with too few held-out items are measured but not judged: on a handful of
                # items the loss moves by more than the budget from noise alone.
                judged = {d for d, v in self.heldout.items() if len(v) >= self.s.gate_min_items}
                decision = judge_update({d: v for d, v in before.items() if d in judged},
                                        {d: v for d, v in after.items() if d in judged},
                                        self.best, self.s.gate_step_budget, self.s.gate_total_budget)
            else:
                after, decision = {}, None
            if decision is None or decision.accept:
                self.learner.accept()
                if self.learner.config.replay_count():
                    self.replay.extend([ex for ex in train if ex.reward > 0])
                self.recent.extend(train)
                for d, v in after.items():
                    self.best[d] = min(v, self.best.get(d, math.inf))
                self.last_heldout = after or self.last_heldout
                outcomes += [(ex.id, "learned") for ex in train]
                rep.learned = len(train)
                rep.learned_tokens = new_tokens
                self.counters["interactions_learned"] += len(train)
                self.counters["since_reduction"] += len(train)
            else:
                self.learner.rollback()
                self.counters["rollbacks"] += 1
                rep.rollback, rep.rollback_detail = decision.reason, decision.detail
                log.warning("lineage %s: update rolled back (%s): %s", self.lineage, decision.reason, decision.detail)
                outcomes += [(ex.id, "rolled_back") for ex in train]
            self.counters["update_steps"] += rep.steps
            if not rep.rollback:
                self.counters["adapter_steps"] += rep.steps
            if self.tuner is not None:
                rep.tuning = self.tuner.observe(Signal(forgetting(after or self.last_heldout, self.best),
                                                       rep.rollback is not None, rep.train_loss))
                for c in rep.tuning:
                    log.info("lineage %s: self-tuning %s %.4g -> %.4g: %s", self.lineage, c.knob, c.old, c.new, c.reason)
        self.last_entry_id = interactions[-1].entry_id
        self.checkpoint(outcomes)
        return self._finish(rep, t0)

    def knobs(self) -> Knobs:
        """The learning rate, replay ratio and distillation weight before the phase adjusts them."""
        if self.tuner is not None:
            return self.tuner.knobs
        return Knobs(self.s.learning_rate, self.s.replay_ratio, self.s.distill_weight)

    def _configure_window(self, rep: LearnReport) -> None:
        """Set the learner up for this window: the phase in force, then the (tuned) knobs."""
        _, phase = self.schedule.at(self.counters["adapter_steps"])
        if phase.name != self.phase:
            log.info("lineage %s: phase %s from adapter step %d", self.lineage, phase.name,
                     self.counters["adapter_steps"])
            self.phase = phase.name
        k = self.knobs()
        cfg = self.learner.config
        self.learner.set_learning_rate(k.learning_rate * phase.lr_scale)
        cfg.replay_ratio = k.replay_ratio if phase.replay_ratio is None else phase.replay_ratio
        cfg.distill_weight = k.distill_weight
        self.learner.train_only(phase.modules)
        rep.phase = phase.name
        rep.knobs = {"learning_rate": cfg.learning_rate, "replay_ratio": cfg.replay_ratio,
                     "distill_weight": cfg.distill_weight}

    def _finish(self, rep: LearnReport, t0: float) -> LearnReport:
        rep.heldout = dict(self.last_heldout)
        rep.forgetting = forgetting(self.last_heldout, self.best)
        rep.replay_items = len(self.replay)
        rep.update_seconds = time.perf_counter() - t0
        rep.reduce_due = self.s.reduction_policy().due(self.counters["since_reduction"])
        return rep

    # -- durability ------------------------------------------------------------------------------
    def checkpoint(self, outcomes: Sequence[tuple[str, str]] = ()) -> None:
        """Record ``outcomes`` under the next step, write the checkpoint, then switch ``live`` to it."""
        self.step += 1
        if outcomes:
            self.ledger.record(outcomes, self.step)
        ckpt = self.dir.new_checkpoint_dir(self.step)
        try:
            self.learner.save(ckpt)
            atomic_write_json(ckpt / "replay.json", self.replay.to_json())
            atomic_write_json(ckpt / "heldout.json", {d: [e.to_json() for e in v] for d, v in self.heldout.items()})
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
            "phase": self.phase,
            "knobs": vars(self.knobs()),
            "updated_at": now_rfc3339(),
        }

    def status(self) -> dict:
        return {"lineage": self.lineage, "generation": self.generation, "n_params": self.n_params,
                "step": self.step, "replay_items": len(self.replay), "heldout": self.last_heldout,
                **self.counters}

    # -- reduction -------------------------------------------------------------------------------
    def reduce(self, trigger: str = "command") -> ReductionReport:
        """Merge, score, prune, heal, gate; promote the next generation or keep the current one."""
        t0 = time.perf_counter()
        s, policy = self.s, self.s.reduction_policy()
        parent = self.generation
        both = self.replay.all() + list(self.recent)
        calib = both[-s.calibration_items:]  # the latest: scored for importance and the allocation
        # Healed on: everything this lineage keeps of its own data (recent items are usually in replay too).
        kept = list({ex.id: ex for ex in both}.values())
        heldout = {d: v for d, v in self.heldout.items() if v}
        gate_sets = heldout or ({"calibration": calib} if calib else {})
        if not calib:
            return ReductionReport(self.lineage, "rejected", parent, parent, self.n_params, self.n_params,
                                   time.perf_counter() - t0, detail="no interactions to calibrate on yet")
        bf16 = s.precision == "bf16"

        def ppl(model) -> dict[str, float]:
            return {d: math.exp(evaluate_loss(model, self.tokenizer, v, s.max_seq_len, s.batch_size, bf16))
                    for d, v in gate_sets.items()}

        log.info("lineage %s: reducing %s (trigger %s)", self.lineage, parent, trigger)
        teacher = merge_adapter(self.learner.model, calib[:4], self.tokenizer, s.max_seq_len)
        ppl_before = ppl(teacher)
        importance = activation_importance(teacher, calib, self.tokenizer, s.max_seq_len, s.batch_size)
        shape = ModelShape.of(teacher.config)
        probe = calib[: max(8, len(calib) // 2)]
        tries, chosen = [], None
        for keep in policy.keeps():
            # Measure every allocation of this budget (width / KV groups / depth) before healing; heal the best.
            candidates = []
            for plan in plan_candidates(shape, keep):
                student = prune(teacher, importance, plan.intermediate, plan.kv_heads, plan.layers)
                candidates.append((evaluate_loss(student, self.tokenizer, probe, s.max_seq_len, s.batch_size, bf16),
                                   plan))
                del student
            _, plan = min(candidates, key=lambda c: c[0])
            log.info("lineage %s: keep %.2f allocations (calibration loss) %s -> %s", self.lineage, keep,
                     {p.label: round(l, 3) for l, p in candidates}, plan.label)
            student = prune(teacher, importance, plan.intermediate, plan.kv_heads, plan.layers)
            ppl_pruned = ppl(student)
            # Both least-squares steps fit the calibration items and can overfit a few of them (32 items in
            # the reduction benchmark's cascade: held-out 7.94 after the refit, 8.97 after the reconstruction):
            # each is kept only where held-out data agrees.
            plain = prune(teacher, replace(importance, mlp_gram=None, attn_gram=None), plan.intermediate,
                          plan.kv_heads, plan.layers)
            ppl_cut = ppl(plain)
            def worst(after: dict[str, float]) -> float:  # the gate's measure: worst ratio to the parent
                return policy.passes(ppl_before, after)[1]

            refitted = worst(ppl_pruned) <= worst(ppl_cut)
            if not refitted:
                student, ppl_pruned = plain, ppl_cut
            del plain
            cut = {k: v.clone() for k, v in student.state_dict().items()}
            reconstruct(student, teacher, kept_blocks(importance, plan.layers), calib, self.tokenizer, s.max_seq_len,
                        s.batch_size)
            ppl_reconstructed = ppl(student)
            reconstructed = worst(ppl_reconstructed) <= worst(ppl_pruned)
            if not reconstructed:
                student.load_state_dict(cut)
            del cut

            def progress(i, n, loss, keep=keep):
                if i == n or i % max(1, n // 5) == 0:
                    log.info("lineage %s: healing keep=%.2f step %d/%d kl=%.4f", self.lineage, keep, i, n, loss)

            kl = heal(student, teacher, kept, self.tokenizer, s.max_seq_len, s.heal_steps, bf16=bf16,
                      progress=progress)
            ppl_after = ppl(student)
            ok, worst = policy.passes(ppl_before, ppl_after)
            tries.append({"keep_target": keep, "keep_achieved": round(plan.keep_achieved, 4), "plan": plan.label,
                          "candidates": {p.label: round(l, 4) for l, p in candidates},
                          "mlp_intermediate": plan.intermediate, "kv_heads": plan.kv_heads, "layers": plan.layers,
                          "ppl_cut": ppl_cut, "refit_kept": refitted, "ppl_pruned": ppl_pruned,
                          "ppl_reconstructed": ppl_reconstructed, "reconstruction_kept": reconstructed, "ppl_healed": ppl_after,
                          "worst_ratio": worst, "passed": ok, "heal_final_kl": kl[-1] if kl else None})
            log.info("lineage %s: keep %.2f -> worst held-out ppl ratio %.3f (%s)", self.lineage, keep, worst,
                     "pass" if ok else "fail")
            if ok:
                chosen = (plan, student, ppl_after)
                break
            del student

        self.counters["since_reduction"] = 0
        if chosen is None:
            del teacher
            self._reload_after_reduction()
            self.checkpoint()
            return ReductionReport(self.lineage, "rejected", parent, parent, self.n_params, self.n_params,
                                   time.perf_counter() - t0, detail=f"gate failed at every keep: {tries}")

        plan, student, ppl_after = chosen
        tokenizer, vocab = self.tokenizer, None
        if s.reduce_vocab:
            student, tokenizer, vocab = self._trim_vocabulary(student, both, gate_sets, bf16, ppl_before, ppl_after,
                                                              policy)
            if vocab["kept"]:
                ppl_after = vocab["ppl_after"]
        gen = self.dir.next_gen()
        n_after = count_parameters(student)
        card = {
            "lineage": self.lineage,
            "generation": int(gen.split("-")[1]),
            "parent": f"{self.lineage}/{parent}",
            "created_at": now_rfc3339(),
            "n_params": n_after,
            "interactions_seen": self.counters["interactions_learned"],
            "reduction": {
                "trigger": trigger,
                "merged_adapter": {"rank": s.lora_rank, "update_steps": self.counters["update_steps"]},
                "importance": "activations on the lineage's replay + recent data: MLP neuron RMS x down_proj column "
                              "norm, KV group RMS head output, block 1 - cos(input, output)",
                "reconstruction": "down_proj / o_proj refitted by least squares to the unpruned outputs, then block "
                                  "by block to the parent's residual stream (least squares, then each MLP trained "
                                  "on the block's cached inputs), on the calibration items (each kept only where "
                                  "it does not worsen held-out perplexity)",
                "calibration_items": len(calib),
                "heal_items": len(kept),
                "pruned": {"mlp_intermediate": [shape.intermediate, plan.intermediate],
                           "attention_heads": [shape.heads, plan.heads], "kv_heads": [shape.kv_heads, plan.kv_heads],
                           "layers": [shape.layers, plan.layers]},
                "keep_target": s.reduce_keep,
                "keep_achieved": round(plan.keep_achieved, 4),
                "n_params_before": self.n_params,
                "n_params_after": n_after,
                "non_embedding_before": shape.non_embedding(),
                "non_embedding_after": shape.reshaped(plan.intermediate, plan.kv_heads, plan.layers).non_embedding(),
                "heal_steps": s.heal_steps,
                "gate": {"budget_ppl_ratio": s.reduce_budget, "ppl_before": ppl_before, "tries": tries,
                         "passed": True},
                "vocabulary": vocab,
            },
            "eval": {d: {"loss": math.log(p), "perplexity": p} for d, p in ppl_after.items()},
        }
        staging = self.dir.staging_dir()
        try:
            student.save_pretrained(str(staging), safe_serialization=True)
            tokenizer.save_pretrained(str(staging))
            card["exports"], export_failures = self._export(staging, gen)
            self.dir.publish_generation(staging, gen, card)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.dir.set_current(gen)
        n_before = self.n_params
        del teacher, student
        self._reload_after_reduction()
        self.counters["adapter_steps"] = 0  # a fresh adapter: the phase schedule starts again
        self.best = {}
        self.last_heldout = {}
        self._heldout_dirty = True
        self.checkpoint()
        log.info("lineage %s: promoted %s (%d -> %d parameters)", self.lineage, gen, n_before, n_after)
        return ReductionReport(self.lineage, "promoted", gen, parent, n_before, n_after, time.perf_counter() - t0,
                               card=card, export_failures=export_failures)

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

    def _trim_vocabulary(self, model, items: list[Example], gate_sets: dict[str, list[Example]], bf16: bool,
                         ppl_before: dict[str, float], ppl_after: dict[str, float], policy):
        """``model`` and its tokenizer without the tokens ``items`` never use, or unchanged (with the
        record of why) when the reduction, trim included, would leave the gate's budget.

        Text the kept tokens do not cover is split into shorter tokens, which the model spells less well,
        so the trim is judged per byte of text: the trimmed model's held-out loss per byte, over the
        untrimmed one's, scales the untrimmed model's loss per token, which gives the perplexity the
        trimmed model would have in the parent's tokens, judged against the parent like every other try.
        """
        s = self.s
        keep = kept_token_ids(self.tokenizer, token_counts(self.tokenizer, items))
        small, small_tok = trim_vocabulary(model, self.tokenizer, keep)

        def per_byte(m, tok) -> dict[str, float]:
            return {d: evaluate_loss(m, tok, v, s.max_seq_len, s.batch_size, bf16, per_byte=True)
                    for d, v in gate_sets.items()}

        before, after = per_byte(model, self.tokenizer), per_byte(small, small_tok)
        in_parent_tokens = {d: ppl_after[d] ** (after[d] / before[d]) for d in before}
        kept, worst = policy.passes(ppl_before, in_parent_tokens)
        record = {"tokens": [len(self.tokenizer), len(keep)], "items": len(items), "kept": kept,
                  "loss_per_byte_before": before, "loss_per_byte_after": after,
                  "ppl_in_parent_tokens": in_parent_tokens, "worst_ratio": worst}
        log.info("lineage %s: vocabulary %d -> %d tokens, held-out loss per byte %s -> %s, worst ratio %.3f (%s)",
                 self.lineage, len(self.tokenizer), len(keep), before, after, worst, "kept" if kept else "dropped")
        if not kept:
            return model, self.tokenizer, record
        record["ppl_after"] = {d: math.exp(evaluate_loss(small, small_tok, v, s.max_seq_len, s.batch_size, bf16))
                               for d, v in gate_sets.items()}
        return small, small_tok, record

    def _reload_after_reduction(self) -> None:
        """The merge consumed the in-memory model: load the current generation and live adapter."""
        state = self.dir.live_state() or {}
        self._load_learner(state, self.dir.live_target())

    def close(self) -> None:
        self.ledger.close()
