"""Settings: one pydantic-settings model, read from ``CASCADE_*`` environment variables, a TOML file
(``--config FILE`` or ``CASCADE_CONFIG``; keys are the names below without the prefix, e.g.
``batch_size = 8``), or the defaults. Environment beats the file. A bad value stops the daemon at
start with a message naming the setting, e.g. ``invalid setting CASCADE_REPLAY_RATIO: ...``.
"""
from __future__ import annotations

import contextvars
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from learners.config import ALL_CONSTRAINTS, UpdateConfig
from policies.curation import DECISIONS, CurationConfig, JunkLimits, parse_decisions
from policies.reduction import ReductionPolicy

_toml_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("cascade_toml", default=None)


_U = UpdateConfig()  # the update step's defaults, written once (learners/config.py)
_C = CurationConfig()  # curation's, likewise (policies/curation.py)
ESSENTIAL, TUNING, EXPERIMENTAL = ({"group": g} for g in ("essential", "tuning", "experimental"))


class SettingsError(ValueError):
    """A setting is invalid; the message names it."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CASCADE_", extra="forbid", validate_default=True)

    # -- where things are ------------------------------------------------------------------------
    home: Path = Field(Path("./.cascade"), description="state root: registry, checkpoints, replay, embedded Redis",
                       json_schema_extra=ESSENTIAL)
    redis_url: str | None = Field(None, description="Redis to read from (redis://, rediss://, unix://; password in "
                                  "the URL); unset = embedded Redis under home", json_schema_extra=ESSENTIAL)
    ray_address: str | None = Field(None, description="existing Ray cluster (ray://... or auto); unset = local Ray",
                                    json_schema_extra=ESSENTIAL)
    stream: str = Field("cascade:interactions", min_length=1, max_length=256, description="interaction stream key",
                        json_schema_extra=ESSENTIAL)
    group: str = Field("cascade", min_length=1, max_length=256, description="consumer group on the stream",
                       json_schema_extra=ESSENTIAL)
    base_model: Path | None = Field(None, description="generation 0 of lineage main: a local HF model directory; "
                                    "unset = embedded SmolLM2-135M", json_schema_extra=ESSENTIAL)
    metrics_host: str = Field("127.0.0.1", description="address of /metrics and /healthz", json_schema_extra=ESSENTIAL)
    metrics_port: int = Field(9477, ge=0, le=65535, description="port of /metrics and /healthz (0 = any free port)",
                              json_schema_extra=ESSENTIAL)

    # -- the update step -------------------------------------------------------------------------
    batch_size: int = Field(_U.batch_size, ge=1, le=1024, description="rows per optimizer step, new + replayed",
                            json_schema_extra=ESSENTIAL)
    learning_rate: float = Field(_U.learning_rate, gt=0, le=1.0, description="AdamW learning rate of the LoRA "
                                 "adapter", json_schema_extra=ESSENTIAL)
    max_seq_len: int = Field(_U.max_seq_len, ge=8, le=8192, description="tokens per row (prompt + response); longer "
                             "rows lose the start of the prompt", json_schema_extra=ESSENTIAL)
    lora_rank: int = Field(_U.lora_rank, ge=1, le=512, description="rank of the LoRA adapter on every linear layer",
                           json_schema_extra=ESSENTIAL)
    precision: Literal["fp32", "bf16"] = Field("fp32", description="autocast dtype of the learner (CPU or GPU)",
                                               json_schema_extra=TUNING)
    activation_checkpointing: bool = Field(
        _U.activation_checkpointing, description="recompute the decoder's activations in the backward pass instead "
        "of keeping them: a learner's peak memory 3.8 -> 1.6 GB on SmolLM2 at batch 8 x 256, for one more forward "
        "pass per step", json_schema_extra=TUNING)
    device: str = Field("auto", description="where learners run: auto (a GPU when one is present), cpu, cuda, cuda:N",
                        json_schema_extra=ESSENTIAL)
    window_steps: int = Field(4, ge=1, le=1000, description="optimizer steps per update window (one gate check); "
                              "the learner asks for as many interactions as fill them", json_schema_extra=TUNING)

    # -- keeping what it knew --------------------------------------------------------------------
    replay_ratio: float = Field(_U.replay_ratio, ge=0.0, lt=1.0, description="share of each batch drawn from "
                                "replay; 0 = no replay (the one switch for replay)", json_schema_extra=ESSENTIAL)
    replay_weight: float = Field(_U.replay_weight, ge=0.0, le=1.0, description="a replayed row's weight in the task "
                                 "loss, relative to a new row's (1 = every row alike)", json_schema_extra=TUNING)
    replay_capacity: int = Field(2000, ge=0, le=10_000_000, description="replay items kept per lineage (reservoir)",
                                 json_schema_extra=ESSENTIAL)
    replay_max_bytes: int = Field(64 << 20, ge=0, description="bytes of text the replay store keeps per lineage",
                                  json_schema_extra=TUNING)
    constraints: str = Field(",".join(sorted(_U.constraints)), description="the loss terms on: 'none' or a comma "
                             "list of " + ",".join(sorted(ALL_CONSTRAINTS)) + " ('replay' is accepted as an old "
                             "spelling and changes nothing: replay_ratio decides)", json_schema_extra=ESSENTIAL)
    anchor_weight: float = Field(_U.anchor_weight, gt=0, description="weight of the L2 pull towards the last "
                                 "accepted adapter ('anchor'; leave it out of constraints to switch it off)",
                                 json_schema_extra=TUNING)
    distill_weight: float = Field(_U.distill_weight, gt=0, description="weight of the KL that keeps replayed rows "
                                  "where they were learned: toward each row's best stored prediction, else the "
                                  "generation where it knows the next token better ('distill'; leave it out of "
                                  "constraints to switch it off)", json_schema_extra=TUNING)
    max_grad_norm: float = Field(_U.max_grad_norm, gt=0, description="gradient clipping norm ('clip')",
                                 json_schema_extra=TUNING)
    max_update_scale: float = Field(_U.max_update_scale, gt=0, description="cap on one step's L2 change to the "
                                    "adapter, in units of learning_rate x sqrt(trainable parameters) ('clip')",
                                    json_schema_extra=TUNING)
    gate: bool = Field(True, description="on/off: the held-out check that rolls an update back (the held-out "
                       "split is kept either way)", json_schema_extra=ESSENTIAL)
    gate_step_budget: float = Field(0.25, gt=0, description="nats one window may raise a held-out source (beyond "
                                    "noise) before the window is judged harmful and its interactions set aside",
                                    json_schema_extra=TUNING)
    gate_total_budget: float = Field(0.15, gt=0, description="nats a held-out source may sit above its best: the "
                                     "bound on cumulative forgetting per source", json_schema_extra=TUNING)
    heldout_fraction: float = Field(0.05, ge=0, lt=1, description="share of interactions kept out of training "
                                    "(chosen by a hash of the id), per source", json_schema_extra=TUNING)
    heldout_per_domain: int = Field(32, ge=1, le=10_000, description="held-out items kept per source (reservoir)",
                                    json_schema_extra=TUNING)
    gate_min_items: int = Field(8, ge=1, description="held-out items a source needs before the gate judges it",
                                json_schema_extra=TUNING)

    gate_first_items: int = Field(8, ge=0, le=10_000, description="held-out items per source the gate measures "
                                  "after every window; the rest only where these leave the verdict open, and every "
                                  "gate_exact_every windows (0: every item after every window)",
                                  json_schema_extra=TUNING)
    gate_exact_every: int = Field(4, ge=1, le=1000, description="accepted windows after which a source is measured on "
                                  "all its held-out items again, its loss exact (not estimated from the first items)",
                                  json_schema_extra=TUNING)
    gate_noise_z: float = Field(2.0, ge=0, description="a held-out loss counts as moved only beyond this many "
                                "standard errors of its paired per-item change", json_schema_extra=TUNING)
    gate_retries: int = Field(2, ge=0, le=10, description="tries of a window over the forgetting bound under stronger "
                              "protection (half the rate, twice the distillation, replay of the sources it hurt) "
                              "before its interactions are deferred", json_schema_extra=TUNING)
    defer_capacity: int = Field(512, ge=0, description="deferred interactions kept per lineage to be tried again "
                                "(beyond it, the oldest stay in the replay store)", json_schema_extra=TUNING)
    defer_tries: int = Field(4, ge=1, le=100, description="windows a deferred interaction is tried in before it is "
                             "set aside as unlearnable", json_schema_extra=TUNING)

    # -- curation: what is worth learning (policies/curation.py, docs/curation.md) -----------------
    curation: str = Field(",".join(_C.decisions), description="what each lineage skips before learning: "
                          "'none' (everything valid is learned) or a comma list of " + ",".join(DECISIONS) + ": "
                          "exact = the same prompt and response learned recently, near = a MinHash near-duplicate "
                          "of recent content, junk = a response of hardly any letters or digits or looping words, "
                          "fair = one source (meta.domain, meta.producer) over curation_fair_share of a window, "
                          "loss = the live model's loss on the response outside [curation_loss_low, "
                          "curation_loss_high]. The default holds only the decisions that never skip new text "
                          "(fair and loss wait for bench/curation to choose their numbers); skipped interactions "
                          "go to <stream>:skipped with their reason", json_schema_extra=ESSENTIAL)
    curation_capacity: int = Field(_C.capacity, ge=1, le=10_000_000, description="recent items per lineage the exact "
                                   "and near-duplicate checks remember (each; the oldest forgotten first; 512 bytes "
                                   "of MinHash an item at num_perm 128)", json_schema_extra=TUNING)
    curation_threshold: float = Field(_C.threshold, ge=0.3, le=1.0, description="estimated Jaccard similarity of word "
                                      "pairs (2-gram shingles) at which an interaction is a near-duplicate",
                                      json_schema_extra=TUNING)
    curation_num_perm: int = Field(_C.num_perm, ge=16, le=1024, description="MinHash permutations (more: a finer "
                                   "similarity estimate, more time and memory per item)", json_schema_extra=TUNING)
    curation_fair_share: float = Field(_C.fair_share, gt=0, le=1.0, description="largest share of a window one source may "
                                       "take while other sources share the window ('fair')", json_schema_extra=TUNING)
    curation_min_alnum: float = Field(_C.junk.min_alnum_share, ge=0, le=1.0, description="'junk': share of a response's visible "
                                      "characters (from 8) that must be letters or digits", json_schema_extra=TUNING)
    curation_max_repetition: float = Field(_C.junk.max_repetition, gt=0, le=1.0, description="'junk': largest share of repeated word "
                                           "3-grams in a response of 16 words or more", json_schema_extra=TUNING)
    curation_loss_low: float = Field(_C.loss_low, ge=0, description="'loss': nats/token under which a response is "
                                     "already known (skipped as known)", json_schema_extra=TUNING)
    curation_loss_high: float = Field(_C.loss_high, gt=0, description="'loss': nats/token over which a response is noise to "
                                      "the model (skipped as improbable)", json_schema_extra=TUNING)
    skipped_max_entries: int = Field(100_000, ge=1, le=100_000_000, description="entries <stream>:skipped keeps "
                                     "(XADD MAXLEN ~), and skip records each lineage's ledger keeps",
                                     json_schema_extra=TUNING)

    # -- phases and self-tuning -------------------------------------------------------------------
    phases: str = Field("", description="phases of each adapter's life, e.g. 'warmup: steps=40, modules=q_proj+v_proj, "
                        "lr_scale=0.5, replay_ratio=0.6; full' (see policies/schedule.py); empty = one phase",
                        json_schema_extra=EXPERIMENTAL)
    self_tuning: bool = Field(False, description="on: learning rate (never above the set one), replay ratio and "
                              "distillation weight follow forgetting, rollbacks and the held-out loss of the arriving "
                              "sources, inside the tune_* bounds (see policies/tuning.py)",
                              json_schema_extra=EXPERIMENTAL)
    tune_lr_min: float = Field(5e-5, gt=0, le=1.0, description="self-tuning: lowest learning rate",
                               json_schema_extra=EXPERIMENTAL)
    tune_replay_min: float = Field(0.2, ge=0, lt=1, description="self-tuning: lowest replay ratio",
                                   json_schema_extra=EXPERIMENTAL)
    tune_replay_max: float = Field(0.7, ge=0, lt=1, description="self-tuning: highest replay ratio",
                                   json_schema_extra=EXPERIMENTAL)
    tune_distill_min: float = Field(0.1, ge=0, description="self-tuning: lowest distillation weight",
                                    json_schema_extra=EXPERIMENTAL)
    tune_distill_max: float = Field(2.0, ge=0, description="self-tuning: highest distillation weight",
                                    json_schema_extra=EXPERIMENTAL)
    tune_forgetting_target: float = Field(0.05, gt=0, description="nats of forgetting the self-tuner steers under",
                                          json_schema_extra=EXPERIMENTAL)

    meta_init: bool = Field(False, description="on: a fresh adapter (fork, promotion) starts from an initialization "
                            "meta-learned (Reptile) on every lineage's replay data, when there is enough of it",
                            json_schema_extra=EXPERIMENTAL)
    meta_rounds: int = Field(24, ge=1, le=10_000, description="Reptile rounds (one task adapted per round)",
                             json_schema_extra=EXPERIMENTAL)
    meta_inner_steps: int = Field(4, ge=1, le=1000, description="Adam steps per Reptile round",
                                  json_schema_extra=EXPERIMENTAL)

    # -- reduction -------------------------------------------------------------------------------
    reduce_every: int = Field(2000, ge=0, description="interactions per lineage between reductions; 0 = on command",
                              json_schema_extra=ESSENTIAL)
    reduce_keep: float = Field(0.7, gt=0, le=1, description="share of non-embedding parameters a reduction keeps",
                               json_schema_extra=ESSENTIAL)
    reduce_budget: float = Field(1.15, ge=1, description="allowed held-out perplexity ratio after/before reduction",
                                 json_schema_extra=ESSENTIAL)
    heal_steps: int = Field(20, ge=0, le=100_000, description="distillation steps that heal a pruned model",
                            json_schema_extra=TUNING)
    calibration_items: int = Field(256, ge=1, le=100_000, description="latest examples scored for importance, the "
                                   "allocation and the least-squares reconstruction (healing distils on all replay + "
                                   "recent data)", json_schema_extra=TUNING)
    reduce_vocab: bool = Field(False, description="on: a promoted generation also drops the tokens its lineage's "
                               "replay + recent data never use (learners/vocab.py), kept only where the reduction, "
                               "trim included, stays within reduce_budget (held-out loss per byte of text)",
                               json_schema_extra=EXPERIMENTAL)
    reduce_regrow: float = Field(0.0, ge=0, le=1, description="share of the pruned MLP width a reduction gives back "
                                 "as fresh units that write nothing until learning uses them (room for the next "
                                 "specialization; learners/reduction.py regrow); 0: none, until bench/plasticity "
                                 "shows it pays", json_schema_extra=EXPERIMENTAL)

    # -- the service -----------------------------------------------------------------------------
    max_entry_bytes: int = Field(64 * 1024, ge=256, le=64 << 20, description="largest stream entry accepted; larger "
                                 "ones are dead-lettered", json_schema_extra=ESSENTIAL)
    read_count: int = Field(256, ge=1, le=100_000, description="entries per XREADGROUP", json_schema_extra=TUNING)
    read_block_ms: int = Field(500, ge=1, le=60_000, description="how long one XREADGROUP waits for entries",
                               json_schema_extra=TUNING)
    claim_idle_ms: int = Field(60_000, ge=100, description="pending entries idle this long are reclaimed",
                               json_schema_extra=TUNING)
    max_buffered: int = Field(512, ge=1, description="entries read but not yet learned, per lineage, before reading "
                              "pauses", json_schema_extra=TUNING)
    unknown_lineage: Literal["dead_letter", "fork"] = Field("dead_letter", description="an interaction for a lineage "
                                                            "that does not exist: dead-lettered, or forked from main's "
                                                            "current generation", json_schema_extra=ESSENTIAL)
    learner_cpus: float = Field(0, ge=0, description="CPUs each learner declares to Ray (its torch threads match); "
                                "0 = learners share all of this node's cores and take turns", json_schema_extra=TUNING)
    learner_gpus: float = Field(0.25, ge=0, le=8, description="share of a GPU each learner declares to Ray when "
                                "learners use GPUs (0.25: four lineages share one)", json_schema_extra=TUNING)
    seed: int = Field(_U.seed, description="seed of the adapter's initialization, replay sampling and healing",
                      json_schema_extra=TUNING)
    log_format: Literal["text", "json"] = Field("text", description="log lines as text or one JSON object each",
                                                json_schema_extra=ESSENTIAL)

    # -- supervision -----------------------------------------------------------------------------
    startup_timeout: float = Field(120.0, ge=0, le=86_400, description="seconds start-up waits for Redis (and a "
                                   "configured Ray cluster) to answer, trying again with back-off; past it the "
                                   "daemon exits 1 for its supervisor (systemd Restart=on-failure)",
                                   json_schema_extra={"group": "tuning"})

    # -- serving (the OpenAI-compatible API, daemon/serving/) ------------------------------------------
    serve: bool = Field(True, description="on/off: `cascade run` also serves the API",
                        json_schema_extra={"group": "essential"})
    serve_host: str = Field("127.0.0.1", min_length=1, description="the API's address (loopback unless set)",
                            json_schema_extra={"group": "essential"})
    serve_port: int = Field(8000, ge=1, le=65535, description="the API's port", json_schema_extra={"group": "essential"})
    api_keys: str | None = Field(None, repr=False, description="comma-separated bearer tokens; unset = no "
                                 "authentication", json_schema_extra={"group": "essential"})
    serve_replicas: int = Field(1, ge=1, le=256, description="serving replicas (Ray places them)",
                                json_schema_extra={"group": "essential"})
    feedback_ttl: int = Field(3600, ge=1, le=30 * 86400, description="seconds a served completion stays open to "
                              "feedback", json_schema_extra={"group": "essential"})
    feedback_max_items: int = Field(10_000, ge=1, le=10_000_000, description="served completions kept for feedback "
                                    "(each at most max_entry_bytes; the oldest dropped first)",
                                    json_schema_extra={"group": "tuning"})
    serve_cpus: float = Field(1.0, gt=0, le=256, description="CPUs each replica declares to Ray (its torch threads "
                              "match)", json_schema_extra={"group": "tuning"})
    serve_gpus: float = Field(0.25, ge=0, le=8, description="share of a GPU each replica declares when the cluster "
                              "has GPUs (0 = serve on CPUs)", json_schema_extra={"group": "tuning"})
    serve_max_batch: int = Field(16, ge=1, le=512, description="requests decoded together per batch",
                                 json_schema_extra={"group": "tuning"})
    serve_max_queue: int = Field(64, ge=1, le=100_000, description="requests waiting per replica before 429",
                                 json_schema_extra={"group": "tuning"})
    serve_max_body_bytes: int = Field(1 << 20, ge=1024, le=64 << 20, description="largest request body (413 "
                                      "beyond)", json_schema_extra={"group": "tuning"})
    serve_max_prompt_tokens: int = Field(2048, ge=1, le=131_072, description="longest prompt in tokens (413 beyond)",
                                         json_schema_extra={"group": "tuning"})
    serve_max_tokens: int = Field(512, ge=1, le=131_072, description="largest max_tokens a request may ask (400 "
                                  "beyond)", json_schema_extra={"group": "tuning"})
    serve_timeout_s: float = Field(120.0, gt=0, le=3600, description="seconds a request may take (503 beyond)",
                                   json_schema_extra={"group": "tuning"})
    serve_cache_models: int = Field(4, ge=1, le=64, description="model versions (and generations) each replica "
                                    "keeps loaded", json_schema_extra={"group": "tuning"})

    # -- exports (edge) --------------------------------------------------------------------------
    export: str = Field("", description="files each promoted generation is also exported as, into "
                        "<lineage>/gen-NNNN/export/, e.g. 'gguf:q8_0,gguf:f16' (types: f16, q8_0, bf16, f32, q4_0); "
                        "empty = none", json_schema_extra={"group": "essential"})

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource):
        sources = [init_settings, env_settings]
        path = _toml_file.get()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @field_validator("gate", "self_tuning", "meta_init", mode="before")
    @classmethod
    def _on_off(cls, v):
        if isinstance(v, str):
            s = v.strip().lower()
            if s in ("on", "true", "1", "yes"):
                return True
            if s in ("off", "false", "0", "no"):
                return False
            raise ValueError("must be 'on' or 'off'")
        return v

    @field_validator("serve", mode="before")
    @classmethod
    def _serve_on_off(cls, v):
        return cls._on_off(v)

    @field_validator("api_keys")
    @classmethod
    def _api_keys(cls, v):
        if v is not None and (not v.strip() or any(not k.strip() or " " in k.strip() for k in v.split(","))):
            raise ValueError("must be comma-separated tokens without spaces, none empty")
        return v

    @field_validator("constraints")
    @classmethod
    def _constraints(cls, v: str) -> str:
        items = [c.strip() for c in v.split(",") if c.strip()]
        if items == ["none"]:
            return "none"
        unknown = [c for c in items if c not in ALL_CONSTRAINTS | {"replay"}]
        if unknown or not items:
            raise ValueError(f"unknown constraint(s) {unknown or v!r}; use 'none' or a comma list of {sorted(ALL_CONSTRAINTS)}")
        terms = sorted(set(items) - {"replay"})  # the old spelling of replay: CASCADE_REPLAY_RATIO alone decides
        return ",".join(terms) or "none"

    @field_validator("curation")
    @classmethod
    def _curation(cls, v: str) -> str:
        return ",".join(parse_decisions(v)) or "none"

    @field_validator("phases")
    @classmethod
    def _phases(cls, v: str) -> str:
        from policies.schedule import parse_phases

        parse_phases(v)
        return v

    @field_validator("export")
    @classmethod
    def _export(cls, v: str) -> str:
        from learners.export import parse_targets

        return ",".join(f"{fmt}:{typ}" for fmt, typ in parse_targets(v))

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        v = v.strip().lower()
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("must be auto, cpu, cuda or cuda:N")

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v):
        if v is not None and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v

    @field_validator("ray_address")
    @classmethod
    def _ray_address(cls, v):
        if v is not None and v != "auto" and not v.startswith("ray://") and ":" not in v:
            raise ValueError("must be 'auto', ray://HOST:PORT or HOST:PORT")
        return v

    @model_validator(mode="after")
    def _device_present(self):
        # On an existing Ray cluster the GPU may be on another node: Ray places the learner there.
        if self.device.startswith("cuda") and self.ray_address is None:
            import torch

            index = int(self.device[5:] or 0) if ":" in self.device else 0
            if not torch.cuda.is_available() or index >= torch.cuda.device_count():
                raise ValueError(f"CASCADE_DEVICE: {self.device} asked for but this machine has "
                                 f"{torch.cuda.device_count()} CUDA device(s)")
        return self

    @model_validator(mode="after")
    def _tuning_bounds(self):
        if self.self_tuning:
            if self.tune_lr_min > self.learning_rate:
                raise ValueError(f"CASCADE_TUNE_LR_MIN: {self.tune_lr_min:g} must not exceed the set learning rate "
                                 f"{self.learning_rate:g}")
            for knob, lo, hi, value in (("replay", self.tune_replay_min, self.tune_replay_max, self.replay_ratio),
                                        ("distill", self.tune_distill_min, self.tune_distill_max, self.distill_weight)):
                if not lo <= value <= hi:
                    raise ValueError(f"CASCADE_TUNE_{knob.upper()}_MIN/MAX: [{lo:g}, {hi:g}] must hold the set "
                                     f"value {value:g}")
        return self

    @model_validator(mode="after")
    def _loss_band(self):
        if self.curation_loss_low >= self.curation_loss_high:
            raise ValueError(f"CASCADE_CURATION_LOSS_LOW/HIGH: {self.curation_loss_low:g} must be under "
                             f"{self.curation_loss_high:g}")
        return self

    @model_validator(mode="after")
    def _base_model_exists(self):
        if self.base_model is not None and not (self.base_model / "config.json").is_file():
            raise ValueError(f"CASCADE_BASE_MODEL: {self.base_model} is not a model directory (no config.json)")
        return self

    # -- views used by the rest of the system --------------------------------------------------------
    @property
    def constraint_set(self) -> frozenset[str]:
        return frozenset() if self.constraints == "none" else frozenset(self.constraints.split(","))

    def resolved_device(self) -> str:
        """``auto`` becomes ``cuda`` where the process that learns sees a GPU, else ``cpu``."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def update_config(self) -> UpdateConfig:
        return UpdateConfig(lora_rank=self.lora_rank, learning_rate=self.learning_rate, batch_size=self.batch_size,
                            max_seq_len=self.max_seq_len, replay_ratio=self.replay_ratio,
                            replay_weight=self.replay_weight,
                            constraints=self.constraint_set, anchor_weight=self.anchor_weight,
                            distill_weight=self.distill_weight, max_grad_norm=self.max_grad_norm,
                            max_update_scale=self.max_update_scale, bf16=self.precision == "bf16",
                            activation_checkpointing=self.activation_checkpointing, device=self.resolved_device(),
                            seed=self.seed)

    @property
    def curation_decisions(self) -> tuple[str, ...]:
        return parse_decisions(self.curation)

    def curation_config(self):
        """The lineage's curation decisions and their numbers."""
        return CurationConfig(decisions=self.curation_decisions, capacity=self.curation_capacity,
                              num_perm=self.curation_num_perm, threshold=self.curation_threshold,
                              fair_share=self.curation_fair_share, loss_low=self.curation_loss_low,
                              loss_high=self.curation_loss_high,
                              junk=JunkLimits(min_alnum_share=self.curation_min_alnum,
                                              max_repetition=self.curation_max_repetition))

    def phase_schedule(self):
        from policies.schedule import parse_phases

        return parse_phases(self.phases)

    def self_tuner(self):
        """The lineage's self-tuner, or None when ``self_tuning`` is off."""
        if not self.self_tuning:
            return None
        from policies.tuning import Bounds, Knobs, SelfTuner

        return SelfTuner(Knobs(self.learning_rate, self.replay_ratio, self.distill_weight),
                         Bounds((self.tune_lr_min, self.learning_rate), (self.tune_replay_min, self.tune_replay_max),
                                (self.tune_distill_min, self.tune_distill_max)), self.tune_forgetting_target)

    def meta_init_policy(self):
        from policies.adaptation import MetaInitPolicy

        return MetaInitPolicy(enabled=self.meta_init)

    def export_targets(self) -> list[tuple[str, str]]:
        from learners.export import parse_targets

        return parse_targets(self.export)

    def reduction_policy(self) -> ReductionPolicy:
        return ReductionPolicy(every=self.reduce_every, keep=self.reduce_keep, budget=self.reduce_budget)

    def reduction_switches(self):
        """How the daemon's reductions run (``learners.reduce.Switches``; imports torch)."""
        from learners.reduce import Switches

        return Switches(max_seq_len=self.max_seq_len, batch_size=self.batch_size, bf16=self.precision == "bf16",
                        heal_steps=self.heal_steps, regrow=self.reduce_regrow)

    def api_key_list(self) -> list[str]:
        return [k.strip() for k in (self.api_keys or "").split(",") if k.strip()]

    @property
    def registry_root(self) -> Path:
        return self.home / "registry"

    @property
    def control_stream(self) -> str:
        return "cascade:control"

    @property
    def generations_stream(self) -> str:
        return "cascade:generations"

    @property
    def dead_stream(self) -> str:
        return f"{self.stream}:dead"

    @property
    def skipped_stream(self) -> str:
        return f"{self.stream}:skipped"


def load_settings(config_file: str | Path | None = None, **overrides) -> Settings:
    """Settings from the environment, ``config_file`` (or ``CASCADE_CONFIG``) and defaults.

    Raises :class:`SettingsError` naming the first bad setting.
    """
    path = config_file or os.environ.get("CASCADE_CONFIG")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SettingsError(f"config file {path} does not exist")
    token = _toml_file.set(path)
    try:
        return Settings(**overrides)
    except ValidationError as e:
        err = e.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else ""
        where = f"CASCADE_{name.upper()}" if name else "settings"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "no such setting"
        got = err.get("input")
        if name == "redis_url" and isinstance(got, str):
            from daemon.stream import redact_url

            got = redact_url(got)  # never echo a password
        if name == "api_keys":
            got = "<redacted>"  # nor a key
        raise SettingsError(f"invalid setting {where}: {msg} (got {got!r})") from None
    except (ValueError, OSError) as e:  # e.g. a TOML syntax error
        raise SettingsError(f"invalid config file {path}: {e}") from None
    finally:
        _toml_file.reset(token)


GROUPS = {"essential": "Essential: what most deployments set",
          "tuning": "Tuning: the learning and the service, for those who measure",
          "experimental": "Experimental: ideas under study, off by default"}


def configuration_markdown() -> str:
    """docs/configuration.md, written from :class:`Settings` (``python -m daemon.config --markdown``)."""
    lines = ["# Configuration", "",
             "<!-- Generated by `python -m daemon.config --markdown > docs/configuration.md` from daemon/config.py; "
             "tests/test_config.py fails when they differ. Do not edit by hand. -->", "",
             "Every setting comes from a `CASCADE_*` environment variable, a TOML file (`--config FILE` or "
             "`CASCADE_CONFIG`; keys are the names below without the prefix, lower case, e.g. `batch_size = 8`), "
             "or the default. The environment beats the file. A bad value stops the daemon at start with a "
             "message naming the setting. Booleans read `on`/`off` (or true/false).", ""]
    def group(f) -> str:
        return (f.json_schema_extra or {}).get("group", "other")

    titles = {**GROUPS, "other": "Other: settings not yet given a group"}
    for g, title in titles.items():
        fields = [(name, f) for name, f in Settings.model_fields.items() if group(f) == g]
        if not fields:
            continue
        lines += [f"## {title}", "", "| variable | default | meaning |", "|---|---|---|"]
        for name, f in fields:
            d = f.default
            shown = "unset" if d is None else "`on`" if d is True else "`off`" if d is False else f"`{d}`"
            lines.append(f"| `CASCADE_{name.upper()}` | {shown} | {f.description or ''} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m daemon.config --markdown > docs/configuration.md")
    sys.stdout.write(configuration_markdown())
