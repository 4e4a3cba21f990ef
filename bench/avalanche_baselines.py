"""Avalanche's own strategies on the same model, adapter, data and steps as the daemon's configs.

A Naive strategy (plain fine-tuning) with avalanche-lib's ``ReplayPlugin``, ``EWCPlugin`` or
``LwFPlugin``, training the same LoRA adapter (rank, targets, AdamW, learning rate) on the same
stages, ``NEW_PER_STEP`` new rows a step, one epoch per stage; Replay adds as many memory rows to
each step as the daemon's default adds replayed rows.

Language modelling inside a classification framework needs two adapters, both plain data:
the model wrapper returns next-token logits flattened to ``[rows * positions, vocab]`` and the
criterion is cross-entropy over response tokens; and LwF, which distils only the "classes seen in
earlier experiences", is told that every vocabulary entry is such a class (for a language model
every token is an output unit of every task).

avalanche-lib needs torchvision, which the project's own ``.venv`` does not hold (its PyPI build is
compiled for CUDA and breaks ``import transformers`` beside the CPU torch), so these run in a
virtualenv of their own, ``.venv-avalanche`` (``make bench`` makes it): ``bench/continual.py`` writes
a job file and runs ``.venv-avalanche/bin/python -m bench.avalanche_baselines JOB.json OUT.json``.
"""
from __future__ import annotations

import copy
import json
import sys

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from learners.data import IGNORE, Example, collate
from learners.update import LORA_TARGETS, evaluate_loss, load_causal_lm


class NextTokenLogits(torch.nn.Module):
    """x = [B, 2, T] (token ids, attention mask) -> logits [B * (T-1), V]."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        logits = self.model(input_ids=x[:, 0], attention_mask=x[:, 1]).logits
        return logits[:, :-1].reshape(-1, logits.shape[-1])


def lm_criterion(out, y):
    return F.cross_entropy(out.float(), y[:, 1:].reshape(-1), ignore_index=IGNORE)


def to_dataset(tok, records: list[dict], seq: int):
    from avalanche.benchmarks.utils import AvalancheDataset, DataAttribute

    exs = [Example(id=str(i), prompt=r["prompt"], response=r["response"]) for i, r in enumerate(records)]
    b = collate(tok, exs, seq)
    pad = torch.full((len(exs), seq), tok.pad_token_id, dtype=torch.long)
    ids, mask, lab = pad.clone(), torch.zeros_like(pad), torch.full_like(pad, IGNORE)
    w = b.input_ids.shape[1]
    ids[:, :w], mask[:, :w], lab[:, :w] = b.input_ids, b.attention_mask, b.labels
    x = torch.stack([ids, mask], dim=1)
    t = torch.zeros(len(exs), dtype=torch.long)
    first = [int(next((v for v in row if v != IGNORE), 0)) for row in lab.tolist()]
    return AvalancheDataset([TensorDataset(x, lab, t)],
                            data_attributes=[DataAttribute(first, "targets"),
                                             DataAttribute(t.tolist(), "targets_task_labels")])


def run_strategy(name: str, base_model, domains: list[str], train: dict, held: dict, seq: int, lr: float,
                 rank: int, new_per_step: int, replay_rows: int, mem_size: int) -> list[list[float]]:
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.training.plugins import EvaluationPlugin, EWCPlugin, LwFPlugin, ReplayPlugin
    from avalanche.training.supervised import Naive
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(base_model))
    peft_model = get_peft_model(load_causal_lm(base_model), LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    model = NextTokenLogits(peft_model)
    params = [p for p in model.parameters() if p.requires_grad]
    vocab = peft_model.config.vocab_size
    if name == "avalanche-replay":
        plugins = [ReplayPlugin(mem_size=mem_size, batch_size=new_per_step, batch_size_mem=replay_rows)]
    elif name == "avalanche-ewc":
        plugins = [EWCPlugin(ewc_lambda=1.0)]
    elif name == "avalanche-lwf":
        lwf = LwFPlugin(alpha=1.0, temperature=2.0)

        def after_training_exp(strategy, **kw):
            # LwF's own post_adapt, with "classes seen" = the whole vocabulary (it would read them
            # from a classification dataset's per-task class sets, which a token stream has not).
            lwf.lwf.expcount += 1
            lwf.lwf.prev_model = copy.deepcopy(strategy.model)
            lwf.lwf.prev_classes_by_task[0] = set(range(vocab))

        lwf.after_training_exp = after_training_exp
        plugins = [lwf]
    else:
        plugins = []
    strategy = Naive(model=model, optimizer=torch.optim.AdamW(params, lr=lr, weight_decay=0.0),
                     criterion=lm_criterion, train_mb_size=new_per_step, train_epochs=1, eval_mb_size=8,
                     device="cpu", plugins=plugins, evaluator=EvaluationPlugin(loggers=[]))
    stages = [to_dataset(tok, train[d], seq) for d in domains]
    bench = benchmark_from_datasets(train=stages)
    rows = []
    for exp in bench.train_stream:
        strategy.train(exp, num_workers=0)
        peft_model.eval()
        rows.append([evaluate_loss(peft_model, tok, held[d], seq, 8) for d in domains])
        print(f"  {name}: after {domains[len(rows) - 1]}: " + " ".join(f"{v:.3f}" for v in rows[-1]), flush=True)
    return rows


def main(argv: list[str]) -> int:
    """``JOB.json OUT.json``: the job's keyword arguments to :func:`run_strategy` in, its rows out."""
    job_path, out_path = argv
    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)
    torch.set_num_threads(job.pop("threads", 2))
    job["held"] = {d: [Example.from_json(x) for x in v] for d, v in job["held"].items()}
    rows = run_strategy(**job)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump({"R": rows}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
