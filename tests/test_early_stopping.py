"""Early stopping: the validation minimum is kept (step 0 included), patience stops a run, resume continues it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import toy_records
from moa_core.methods import DomainData, fit_method
from moa_core.train import train_loop, train_peft_lora


def _scripted(values: list[float], seen: list[float], p: nn.Parameter):
    """A validation loss read from a script; records the parameter's value at each evaluation."""
    it = iter(values)

    def validate() -> float:
        seen.append(float(p.detach()))
        return next(it)
    return validate


def _toy_loop(cfg, p, validate, steps=10, ckpt=None):
    def batches(start):
        while True:
            yield {"attention_mask": torch.ones(1, 1)}

    def step_fn(_b):  # every step moves p by about -lr: the parameter value tells the step
        return -p, {}
    return train_loop({"p": p}, batches, step_fn, steps, 0.1, cfg, ckpt_dir=ckpt, validate=validate)


def test_best_validation_step_is_kept_and_patience_stops(tiny_cfg):
    cfg = tiny_cfg.train.model_copy(update={"eval_every": 2, "patience": 2, "warmup_fraction": 0.0, "checkpoint_every": 100})
    seen: list[float] = []
    p = nn.Parameter(torch.zeros(()))
    # step 0: 5, step 2: 3 (best), step 4: 4, step 6: 4.5 -> two evaluations without improvement: stop at 6
    result = _toy_loop(cfg, p, _scripted([5.0, 3.0, 4.0, 4.5, 1.0], seen, p))
    assert [v["step"] for v in result.val_history] == [0, 2, 4, 6]
    assert result.best_step == 2 and result.stopped_at == 6
    assert max(h["step"] for h in result.history) == 6
    assert float(p.detach()) == seen[1] != seen[-1]  # the parameters of step 2 are kept, not step 6's


def test_parameters_of_the_best_step_are_restored(tiny_cfg):
    cfg = tiny_cfg.train.model_copy(update={"eval_every": 1, "patience": 3, "warmup_fraction": 0.0, "checkpoint_every": 100})
    p = nn.Parameter(torch.zeros(()))
    values = iter([5.0, 4.0, 2.0, 3.0, 3.5, 3.6])
    at_eval: list[float] = []

    def batches(start):
        while True:
            yield {"attention_mask": torch.ones(1, 1)}

    def validate():
        at_eval.append(float(p.detach()))
        return next(values)
    result = train_loop({"p": p}, batches, lambda b: (-p, {}), 10, 0.1, cfg, validate=validate)
    assert result.best_step == 2 and result.stopped_at == 5
    assert float(p.detach()) == at_eval[2] != at_eval[-1]


def test_step_zero_wins_when_training_only_hurts(tiny_cfg):
    cfg = tiny_cfg.train.model_copy(update={"eval_every": 1, "patience": 2, "warmup_fraction": 0.0, "checkpoint_every": 100})
    p = nn.Parameter(torch.full((), 3.0))
    values = iter([1.0, 2.0, 3.0])

    def batches(start):
        while True:
            yield {"attention_mask": torch.ones(1, 1)}
    result = train_loop({"p": p}, batches, lambda b: (-p, {}), 10, 0.1, cfg, validate=lambda: next(values))
    assert result.best_step == 0 and float(p.detach()) == 3.0  # the starting weights ship


def test_resume_after_an_early_stop_does_not_train_again(tiny_cfg, tmp_path):
    cfg = tiny_cfg.train.model_copy(update={"eval_every": 1, "patience": 1, "warmup_fraction": 0.0, "checkpoint_every": 100})
    p = nn.Parameter(torch.zeros(()))

    def batches(start):
        while True:
            yield {"attention_mask": torch.ones(1, 1)}
    vals = iter([2.0, 1.0, 1.5])
    first = train_loop({"p": p}, batches, lambda b: (-p, {}), 10, 0.1, cfg, ckpt_dir=tmp_path, validate=lambda: next(vals))
    assert first.stopped_at == 2 and first.best_step == 1
    kept = float(p.detach())
    q = nn.Parameter(torch.zeros(()))
    again = train_loop({"p": q}, batches, lambda b: (-q, {}), 10, 0.1, cfg, ckpt_dir=tmp_path,
                       validate=lambda: (_ for _ in ()).throw(AssertionError("validated again")))
    assert again.resumed_from == 2 and again.best_step == 1 and float(q.detach()) == kept


def test_peft_expert_stops_at_its_validation_minimum(tiny_base, tiny_tok, tiny_cfg, tmp_path):
    cfg = tiny_cfg.model_copy(update={"train": tiny_cfg.train.model_copy(update={
        "eval_every": 2, "patience": 2, "epochs": 3.0, "lr": 5e-2, "batch_size": 4})})
    recs = toy_records(1, 16)
    res = train_peft_lora(tiny_base, tiny_tok, recs, cfg, 999, tmp_path / "a", val_by_domain=[recs[0][:4]])
    assert res.steps == 12  # 3 epochs of 16 rows at batch 4, not the 999 given
    assert res.val_history[0]["step"] == 0 and res.best_step is not None
    assert res.best_val_loss == min(v["val_loss"] for v in res.val_history)


def test_moa_stage_two_never_ends_worse_on_validation_than_its_stage_one_experts(tiny_model_dir, tiny_tok, tiny_cfg, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_cfg.model_copy(update={"train": tiny_cfg.train.model_copy(update={
        "eval_every": 1, "patience": 2, "joint_steps": 6, "joint_lr": 0.5, "expert_steps": 4})})  # a rate that hurts
    recs = toy_records(len(cfg.domain_names), 12)
    val = [r[:4] for r in recs]
    dirs = []
    for k, r in enumerate(recs):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        dirs.append(tmp_path / f"e{k}")
        train_peft_lora(base, tiny_tok, [r], cfg, 4, dirs[-1])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    mm, phases = fit_method(cfg, "moa", base, tiny_tok, "tiny", DomainData(recs, val), expert_dirs=dirs)
    joint = phases["joint"]
    assert joint.val_history[0]["step"] == 0
    assert joint.best_val_loss <= joint.val_history[0]["val_loss"]  # never worse than the stage-1 experts
    assert "router" in phases and phases["router"].val_history  # routers fitted to the kept experts
    # what ships is what was validated: the kept experts' loss, measured again, equals the best one
    from moa_core.train import _val_encoded, validation_loss
    from moa_core.metrics import token_nll
    enc = _val_encoded(tiny_tok, val, cfg)
    again = validation_loss(lambda b: token_nll(mm(b["input_ids"], b["attention_mask"], expert=b["expert"]).logits, b["labels"]),
                            enc, cfg.train.batch_size, tiny_tok.pad_token_id, torch.device("cpu"))
    assert again == pytest.approx(joint.best_val_loss, rel=1e-5)


def test_an_expert_can_start_from_the_mixed_adapter(tiny_model_dir, tiny_tok, tiny_cfg, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    recs = toy_records(2, 8)
    train_peft_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tiny_tok, recs, tiny_cfg, 3, tmp_path / "mixed")
    # with a vanishing rate the expert stays where it started: at the mixed adapter, not at a fresh LoRA
    cfg = tiny_cfg.model_copy(update={"train": tiny_cfg.train.model_copy(update={"lr": 1e-9, "warmup_fraction": 0.0})})
    train_peft_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tiny_tok, [recs[0]], cfg, 1, tmp_path / "e",
                    init_from=tmp_path / "mixed")
    mixed, expert = load_file(tmp_path / "mixed/adapter_model.safetensors"), load_file(tmp_path / "e/adapter_model.safetensors")
    assert mixed.keys() == expert.keys()
    assert all(torch.allclose(mixed[k], expert[k], atol=1e-6) for k in mixed)  # started there (lr ~ 0)
    assert any(mixed[k].abs().sum() > 0 for k in mixed if "lora_B" in k)  # a trained B, not zeros equal to zeros
