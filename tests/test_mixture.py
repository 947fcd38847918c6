"""moa_core's expert-mixture layer, routers and recipes on a tiny config-built Llama."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from conftest import toy_records
from helpers import distinct_experts
from moa_core.batching import collate, encode
from moa_core.experts import ExpertMixtureLinear, LayerSlot, Route
from moa_core.methods import build_mixture
from moa_core.model import MixtureError, load_mixture, save_mixture
from moa_core.routing import load_balance_loss, pool, top_k_gates
from moa_core.train import (NonFiniteLossError, clip_grads_per_expert, expert_token_shares, train_loop,
                            train_mixture)


def _random_peft_adapter(base, out: Path, seed: int, r: int = 4, alpha: float = 8.0,
                         targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")) -> Path:
    """A PEFT LoRA adapter with non-zero B (as after training), saved as safetensors."""
    torch.manual_seed(seed)
    pm = get_peft_model(base, PeftLoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    pm.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture
def adapters(tmp_path: Path, tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    return [_random_peft_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / f"a{k}", seed=k)
            for k in range(3)]


def _batch(tok, n_domains: int = 3):
    recs = toy_records(n_domains, 2)
    return collate([encode(tok, recs[k][0], 64) for k in range(n_domains)], tok.pad_token_id, list(range(n_domains)))


def test_gold_routed_moa_reproduces_each_peft_adapter(tiny_cfg, tiny_base, tiny_tok, tiny_model_dir, adapters):
    from transformers import AutoModelForCausalLM

    mm = build_mixture(tiny_cfg, "moa", tiny_base, "tiny")
    for k, a in enumerate(adapters):
        mm.load_peft_expert(k, a)
    mm.eval()
    b = _batch(tiny_tok)
    mixed = mm(b["input_ids"], b["attention_mask"], expert=b["expert"]).logits
    for k, a in enumerate(adapters):
        pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), a).eval()
        ref = pm(input_ids=b["input_ids"][k:k + 1], attention_mask=b["attention_mask"][k:k + 1]).logits
        base_only = mm(b["input_ids"][k:k + 1], b["attention_mask"][k:k + 1], adapters_off=True).logits
        assert (ref - base_only).abs().max() > 1e-3, "the adapter must change the output for the test to mean anything"
        torch.testing.assert_close(mixed[k:k + 1], ref, atol=1e-5, rtol=0)


def test_mixed_batch_equals_one_expert_batches_row_by_row(tiny_cfg, tiny_base, tiny_tok, adapters):
    mm = build_mixture(tiny_cfg, "moa", tiny_base, "tiny")
    for k, a in enumerate(adapters):
        mm.load_peft_expert(k, a)
    mm.eval()
    b = _batch(tiny_tok)
    expert = torch.tensor([2, 0, 1])
    mixed = mm(b["input_ids"], b["attention_mask"], expert=expert).logits
    for i in range(3):
        single = mm(b["input_ids"][i:i + 1], b["attention_mask"][i:i + 1], expert=expert[i:i + 1]).logits
        torch.testing.assert_close(mixed[i:i + 1], single, atol=1e-5, rtol=0)


def test_gated_path_equals_weighted_sum_of_experts():
    """Token-level gates through the rank-concatenated matmul == explicit sum_k g_k s_k B_k A_k x."""
    torch.manual_seed(0)
    slot = LayerSlot(0)
    lin = torch.nn.Linear(6, 5)
    w = ExpertMixtureLinear(lin, slot, num_experts=3, r=2, scaling=1.5)
    torch.nn.init.normal_(w.lora_B)
    x = torch.randn(2, 4, 6)
    gates = torch.rand(2, 4, 3)
    slot.route = Route(gates=gates)
    got = w(x)
    want = lin(x) + sum(gates[..., k:k + 1] * 1.5 * (x @ w.lora_A[k].t() @ w.lora_B[k].t()) for k in range(3))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # an index route is the same as a one-hot gate
    idx = torch.tensor([2, 0])
    slot.route = Route(index=idx)
    by_index = w(x)
    slot.route = Route(gates=torch.nn.functional.one_hot(idx, 3).float()[:, None, :].expand(2, 4, 3))
    torch.testing.assert_close(by_index, w(x), atol=1e-5, rtol=1e-5)


def test_modula_res_formula_on_a_non_square_projection():
    torch.manual_seed(0)
    slot = LayerSlot(0)
    lin = torch.nn.Linear(6, 10)  # d_in != d_out
    w = ExpertMixtureLinear(lin, slot, num_experts=2, r=3, scaling=2.0, universal_r=4, universal_scaling=0.5)
    for p in (w.lora_B, w.universal_B):
        torch.nn.init.normal_(p)
    assert w.lora_A.shape == (2, 3, 10), "domain experts read h, which lives in d_out"
    x = torch.randn(2, 3, 6)
    s = torch.softmax(torch.randn(2, 3, 2), -1)
    slot.route = Route(gates=s)
    h = 0.5 * (x @ w.universal_A.t() @ w.universal_B.t())
    want = lin(x) + h + sum(s[..., k:k + 1] * 2.0 * (torch.nn.functional.leaky_relu(h @ w.lora_A[k].t(), 0.01) @ w.lora_B[k].t())
                            for k in range(2))
    torch.testing.assert_close(w(x), want, atol=1e-5, rtol=1e-5)


def test_top_k_gates_and_balance_loss_on_hand_made_inputs():
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0]]])
    gates, probs = top_k_gates(logits, 2)
    assert (gates > 0).sum() == 2 and torch.isclose(gates.sum(), torch.tensor(1.0))
    p = probs[0, 0]
    torch.testing.assert_close(gates[0, 0, :2], p[:2] / p[:2].sum())
    mask = torch.ones(1, 4)
    # perfectly balanced: uniform probabilities, each expert picked by one token -> loss 1
    uniform = torch.full((1, 4, 4), 0.25)
    one_each = torch.eye(4)[None]
    assert torch.isclose(load_balance_loss(uniform, one_each, mask), torch.tensor(1.0))
    # collapsed: every token sends everything to expert 0 -> loss E
    collapsed = torch.zeros(1, 4, 4)
    collapsed[..., 0] = 1.0
    assert torch.isclose(load_balance_loss(collapsed, collapsed, mask), torch.tensor(4.0))
    # masked tokens do not count
    half = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert torch.isclose(load_balance_loss(collapsed, collapsed, half), torch.tensor(4.0))


def test_pooling_mean_and_last():
    h = torch.arange(12.0).view(1, 4, 3)
    m = torch.tensor([[0, 1, 1, 0]])
    torch.testing.assert_close(pool(h, m, "mean"), h[:, 1:3].mean(1))
    torch.testing.assert_close(pool(h, m, "last"), h[:, 2])


def test_route_shapes_and_last_layer_decision(tiny_cfg, tiny_base, tiny_tok):
    mm = build_mixture(tiny_cfg, "moa", tiny_base, "tiny")
    b = _batch(tiny_tok)
    chosen, logits = mm.route(b["input_ids"], b["attention_mask"])
    L = tiny_base.config.num_hidden_layers
    assert logits.shape == (L, 3, len(tiny_cfg.domain_names)) and chosen.shape == (3,)
    assert torch.equal(chosen, logits[-1].argmax(-1))


def test_moa_stage2_gradients_only_on_routers_and_gold_experts(tiny_cfg, tiny_base, tiny_tok, adapters):
    mm = build_mixture(tiny_cfg, "moa", tiny_base, "tiny")
    for k, a in enumerate(adapters):
        mm.load_peft_expert(k, a)
    mm.set_trainable(experts=True, routers=True)
    mm.train()
    b = _batch(tiny_tok, 3)
    expert = torch.tensor([0, 0, 2])  # expert 1 gets no rows
    out = mm(b["input_ids"], b["attention_mask"], labels=b["labels"], expert=expert, eta=0.1)
    assert out.aux_loss is not None and out.aux_loss > 0
    out.loss.backward()
    assert all(p.grad is None for n, p in mm.model.named_parameters() if ".lora_" not in n), "base must stay frozen"
    w = next(iter(mm.wrapped.values()))
    assert w.lora_B.grad[1].abs().sum() == 0
    assert w.lora_B.grad[0].abs().sum() > 0 and w.lora_B.grad[2].abs().sum() > 0
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in mm.routers)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.float32, torch.bfloat16)])  # one group, and one per dtype
@pytest.mark.parametrize("concat", [False, True, "chunked"])  # the CPU's norms per gradient; an accelerator's
def test_per_expert_clipping_clips_each_expert_as_its_own_job(dtypes, concat, monkeypatch):  # concatenation
    """Expert e's gradient in a mixed batch is share_e x its own rows' gradient, spread over its A and B slices; after
    the clip it must be what clipping that own-rows gradient alone (its job) gives, its norm taken over A and B
    together (also when A and B hold gradients of different dtypes): expert 0 is over the limit, expert 1 under,
    expert 2 idle (no rows: its gradient, here from elsewhere, e.g. the routers' loss, is left as it is)."""
    torch.manual_seed(0)
    own_A = [torch.randn(4, 3) * s for s in (10.0, 0.01, 0.3)]  # each expert's own-rows gradient of A [r, d_in]
    own_B = [torch.randn(5, 4) * s for s in (0.5, 0.01, 0.3)]  # and of B [d_out, r]
    shares = torch.tensor([0.7, 0.3, 0.0])
    A = torch.nn.Parameter(torch.zeros(3, 4, 3, dtype=dtypes[0]))
    B = torch.nn.Parameter(torch.zeros(3, 5, 4, dtype=dtypes[1]))
    A.grad = torch.stack([g * (sh if sh > 0 else 1.0) for sh, g in zip(shares, own_A, strict=True)]).to(dtypes[0])
    B.grad = torch.stack([g * (sh if sh > 0 else 1.0) for sh, g in zip(shares, own_B, strict=True)]).to(dtypes[1])
    idle = (A.grad[2].clone(), B.grad[2].clone())
    router = torch.nn.Parameter(torch.zeros(3, 8))
    router.grad = torch.full((3, 8), 5.0)
    if concat == "chunked":  # a bound below B's 60 elements: A and B concatenated apart, their norms summed
        monkeypatch.setattr("moa_core.train.CLIP_CONCAT_ELEMENTS", 40)
    cats = []
    monkeypatch.setattr(torch, "cat", lambda ts, *a, _f=torch.cat, **k: cats.append(len(ts)) or _f(ts, *a, **k))
    clip_grads_per_expert([A, B], [router], 1.0, shares, concat=bool(concat))
    one_group = dtypes[0] == dtypes[1]
    assert cats == ([] if not concat else [2] if concat is True and one_group else [1, 1])
    tol = {} if dtypes == (torch.float32, torch.float32) else {"rtol": 2e-2, "atol": 1e-3}  # bf16 rounds once
    for e in range(2):
        norm = float(torch.cat([own_A[e].flatten(), own_B[e].flatten()]).norm())
        k = min(1.0, 1.0 / (norm + 1e-6))
        assert k < 0.2 if e == 0 else k == 1.0  # the case the docstring names: one over the limit, one under
        torch.testing.assert_close(A.grad[e].float(), own_A[e] * k, **tol)
        torch.testing.assert_close(B.grad[e].float(), own_B[e] * k, **tol)
    assert torch.equal(A.grad[2], idle[0]) and torch.equal(B.grad[2], idle[1])
    assert float(router.grad.norm()) == pytest.approx(1.0, rel=1e-4)  # the shared group: clipped as one
    cats.clear()
    clip_grads_per_expert([A, B], [], 1.0, shares)  # the default on the CPU: the norms per gradient, no copy
    assert cats == []
    with pytest.raises(ValueError, match="3 experts"):  # a layer with another expert count (MoSLD): not this clip
        C = torch.nn.Parameter(torch.zeros(2, 4))
        C.grad = torch.ones(2, 4)
        clip_grads_per_expert([A, C], [], 1.0, shares, concat=bool(concat))
    labels = torch.tensor([[-100, 1, 2, -100], [-100, -100, 3, 4], [-100, 5, 6, 7]])  # 2, 2, 3 loss tokens
    torch.testing.assert_close(expert_token_shares(torch.tensor([0, 2, 0]), labels, 3), torch.tensor([5 / 7, 0.0, 2 / 7]))


@pytest.mark.parametrize("per_expert", [True, False])
def test_an_expert_trains_the_same_whatever_the_others_gradients(tiny_cfg, tiny_model_dir, tiny_tok, per_expert):
    """Gold-routed training (MoA stage 2): with per-expert clipping expert 0's updates do not depend on expert 1's
    gradient (its own job would not see it); clipping all experts together ties them. The clip is set low so that it
    acts at every step; expert 1's weights differ between the two runs, so does its gradient. The routers' loss is
    off (eta 0): on, it reaches every expert through the hidden states and ties them whatever the clip."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_cfg.model_copy(update={"train": tiny_cfg.train.model_copy(
        update={"grad_clip": 1e-3, "clip_per_expert": per_expert, "weight_decay": 0.0})})
    lora_0 = []
    for scale in (0.0, 3.0):
        torch.manual_seed(0)
        mm = build_mixture(cfg, "moa", AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), "tiny")
        g = torch.Generator().manual_seed(1)  # not the global generator: both runs draw the same dropout masks
        with torch.no_grad():
            for w in mm.wrapped.values():
                w.lora_B[1] = scale * torch.randn(w.lora_B[1].shape, generator=g)
        train_mixture(mm, tiny_tok, toy_records(3, 6), cfg, steps=3, lr=1e-2, train_experts=True, train_routers=True,
                      eta=0.0)
        lora_0.append(mm.expert_tensors(0))
    same = all(torch.allclose(lora_0[0][n], lora_0[1][n], atol=1e-6, rtol=0) for n in lora_0[0])
    assert same == per_expert


def test_modula_router_stage_trains_only_routers(tiny_cfg, tiny_base, tiny_tok):
    mm = build_mixture(tiny_cfg, "modula-res", tiny_base, "tiny")
    before = {n: p.detach().clone() for n, p in mm.mixture_parameters().items() if not n.startswith("routers.")}
    train_mixture(mm, tiny_tok, toy_records(3, 6), tiny_cfg, steps=2, lr=1e-2, train_experts=False,
                  train_routers=True, route="learned")
    after = mm.mixture_parameters()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(not p.requires_grad for n, p in after.items() if not n.startswith("routers."))


def test_modula_flan_domain_experts_keep_their_rank(tiny_cfg, tiny_base, tiny_tok):
    mm = build_mixture(tiny_cfg, "modula-flan", tiny_base, "tiny")
    train_mixture(mm, tiny_tok, toy_records(1, 6), tiny_cfg, steps=2, lr=1e-2, train_experts=True,
                  train_routers=False, route=1)
    dr = tiny_cfg.modula.domain_r
    for w in mm.wrapped.values():
        assert w.lora_A[1:, dr:].abs().sum() == 0 and w.lora_B[1:, :, dr:].abs().sum() == 0
        assert w.lora_B[1].abs().sum() > 0  # the trained domain expert moved


def test_mosld_shares_a_and_dropconnect_only_in_training(tiny_cfg, tiny_base, tiny_tok):
    mm = build_mixture(tiny_cfg, "mosld", tiny_base, "tiny")
    w = next(iter(mm.wrapped.values()))
    assert w.lora_A.shape[0] == 1 and w.dropconnect_p == pytest.approx(0.1)
    assert set(mm.spec.target_modules) == {"q_proj", "v_proj"}
    torch.nn.init.normal_(w.lora_B)
    w.train()
    assert not torch.equal(w._expert_A(), w._expert_A())
    w.eval()
    assert torch.equal(w._expert_A(), w.lora_A)
    res = train_mixture(mm, tiny_tok, toy_records(3, 6), tiny_cfg, steps=2, lr=1e-3, train_experts=True,
                        train_routers=True, route="learned", balance_coef=0.01)
    assert "aux_loss" in res.history[-1] and res.history[-1]["aux_loss"] > 0


def test_save_load_round_trip_and_errors(tmp_path, tiny_cfg, tiny_base, tiny_tok, tiny_model_dir, adapters):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    mm = build_mixture(tiny_cfg, "moa", tiny_base, "tiny")
    for k, a in enumerate(adapters):
        mm.load_peft_expert(k, a)
    out = save_mixture(mm, tmp_path / "mix")
    b = _batch(tiny_tok)
    ref = mm(b["input_ids"], b["attention_mask"], expert=b["expert"]).logits
    again = load_mixture(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), out)
    torch.testing.assert_close(again(b["input_ids"], b["attention_mask"], expert=b["expert"]).logits, ref)
    assert again.spec.experts == mm.spec.experts
    # another base model: clear error naming the base it was trained on
    other = LlamaForCausalLM(LlamaConfig(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(MixtureError, match="trained on|built for"):
        load_mixture(other, out)
    # a truncated weights file is rejected, not half-loaded
    w = out / "mixture.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(MixtureError, match="damaged"):
        load_mixture(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)


def test_adapter_from_another_base_is_rejected(tmp_path, tiny_cfg, tiny_base):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    a = _random_peft_adapter(other, tmp_path / "other", seed=0)
    mm = build_mixture(tiny_cfg, "moa", tiny_base, "tiny")
    with pytest.raises(MixtureError, match="another base model"):
        mm.load_peft_expert(0, a)


def test_adding_a_domain_leaves_old_experts_bit_identical(tiny_cfg, tiny_base, tiny_tok, adapters):
    mm = build_mixture(tiny_cfg, "moa", tiny_base, "tiny")
    for k, a in enumerate(adapters):
        mm.load_peft_expert(k, a)
    n = len(mm.spec.experts)
    old = [mm.expert_hash(k) for k in range(3)]
    k_new = mm.add_expert("law")
    assert k_new == n and mm.spec.experts[-1] == "law" and all(r.num_experts == n + 1 for r in mm.routers)
    assert [mm.expert_hash(k) for k in range(3)] == old
    train_mixture(mm, tiny_tok, toy_records(1, 6), tiny_cfg, steps=3, lr=1e-2, train_experts=True,
                  train_routers=False, route=k_new)
    assert [mm.expert_hash(k) for k in range(3)] == old
    assert next(iter(mm.wrapped.values())).lora_B[k_new].abs().sum() > 0


def test_target_module_the_model_lacks_is_named(tiny_cfg, tiny_base):
    bad = tiny_cfg.model_copy(update={"lora": tiny_cfg.lora.model_copy(update={"target_modules": ["q_proj", "c_attn"]})})
    with pytest.raises(MixtureError, match="c_attn"):
        build_mixture(bad, "moa", tiny_base, "tiny")


def _toy_loop(steps, ckpt, fail_at=None, nan_at=None, cfg=None):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.ones(3))
    target = torch.tensor([1.0, -2.0, 0.5])

    def batches(start):
        step = start
        while True:
            g = torch.Generator().manual_seed(step)
            yield {"x": torch.randn(4, 3, generator=g), "attention_mask": torch.ones(4, 3)}
            step += 1

    calls = {"n": 0}

    def step_fn(b):
        calls["n"] += 1
        if fail_at is not None and calls["n"] == fail_at:
            raise KeyboardInterrupt("simulated kill")
        loss = ((b["x"] @ w - b["x"] @ target) ** 2).mean()
        if nan_at is not None and calls["n"] == nan_at:
            loss = loss * float("nan")
        return loss, {}

    res = train_loop({"w": w}, batches, step_fn, steps, 0.1, cfg, ckpt)
    return w, res


def test_interrupted_training_resumes_to_the_same_result(tmp_path, tiny_cfg):
    cfg = tiny_cfg.train.model_copy(update={"checkpoint_every": 2, "log_every": 1})
    w_ref, ref = _toy_loop(6, None, cfg=cfg)
    with pytest.raises(KeyboardInterrupt):
        _toy_loop(6, tmp_path / "ck", fail_at=4, cfg=cfg)  # killed during step 4; checkpoint at step 2
    w, res = _toy_loop(6, tmp_path / "ck", cfg=cfg)
    assert res.resumed_from == 2 and res.steps == 6 and len(res.history) == len(ref.history)
    torch.testing.assert_close(w, w_ref)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_cfg):
    cfg = tiny_cfg.train.model_copy(update={"checkpoint_every": 2})
    with pytest.raises(NonFiniteLossError, match="step 3"):
        _toy_loop(6, tmp_path / "ck", nan_at=3, cfg=cfg)
    state = torch.load(tmp_path / "ck" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and torch.isfinite(state["params"]["w"]).all()


def test_generate_routes_once_from_the_prompt(tiny_cfg, tiny_base, tiny_tok, adapters):
    mm = build_mixture(tiny_cfg, "moa", tiny_base, "tiny")
    for k, a in enumerate(adapters):
        mm.load_peft_expert(k, a)
    b = collate([{"input_ids": tiny_tok("alpha question", add_special_tokens=False)["input_ids"]}] * 2,
                tiny_tok.pad_token_id, left_pad=True)
    seqs, chosen = mm.generate(b["input_ids"], b["attention_mask"], max_new_tokens=3, do_sample=False,
                               pad_token_id=tiny_tok.pad_token_id)
    assert seqs.shape[1] == b["input_ids"].shape[1] + 3 or seqs.shape[1] <= b["input_ids"].shape[1] + 3
    forced, _ = mm.generate(b["input_ids"], b["attention_mask"], expert=chosen, max_new_tokens=3, do_sample=False,
                            pad_token_id=tiny_tok.pad_token_id)
    assert torch.equal(seqs, forced)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_routing_pass_cache_serves_as_the_prompt_cache(cache, tiny_cfg, tiny_base):
    """generate() reuses the routing pass's KV cache: same tokens and scores as routing, then a full prefill,
    for rows whose layers all agreed with the final expert and for rows that had to be run again."""
    mm = distinct_experts(tiny_cfg, tiny_base)
    ids = torch.randint(3, 250, (8, 12))
    mask = torch.ones_like(ids)
    ids[:3, :4], mask[:3, :4] = 0, 0  # left padding on three rows
    expert, logits = mm.route(ids, mask)
    agree = (logits.argmax(-1) == expert).all(0)
    assert 0 < int(agree.sum()) < 8, "the case needs rows of both kinds"
    gen = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True,
               return_dict_in_generate=True)
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    reused, e1 = mm.generate(ids, mask, **gen, **extra)
    again, _ = mm.generate(ids, mask, **gen, **extra)  # the static cache is reset and refilled
    fresh, e2 = mm.generate(ids, mask, reuse_routing_cache=False, **gen, **extra)
    assert torch.equal(e1, expert) and torch.equal(e2, expert)
    if cache == "static":  # HF's generate built fresh's cache: ours has its length (the decode step's shapes)
        assert reused.past_key_values.layers[0].max_cache_len == fresh.past_key_values.layers[0].max_cache_len == 12 + 5 - 1
    assert torch.equal(reused.sequences, fresh.sequences) and torch.equal(again.sequences, fresh.sequences)
    for a, b in zip(reused.scores, fresh.scores):
        finite = torch.isfinite(b)
        assert torch.equal(finite, torch.isfinite(a)) and torch.allclose(a[finite], b[finite], atol=1e-5)


def test_static_cache_is_kept_across_calls_and_grows_only(tiny_cfg, tiny_base):
    """One static cache serves calls of the same batch while it is long enough (the compiled decode step keeps its
    addresses and shapes); a longer call replaces it with a longer one, and a shorter call after that keeps it."""
    mm = distinct_experts(tiny_cfg, tiny_base)
    gen = dict(do_sample=False, pad_token_id=0, cache_implementation="static")

    def call(prompt: int, new: int):
        ids = torch.randint(3, 250, (2, prompt))
        kw = dict(max_new_tokens=new, min_new_tokens=new, **gen)
        seqs, _ = mm.generate(ids, torch.ones_like(ids), **kw)
        fresh, _ = mm.generate(ids, torch.ones_like(ids), reuse_routing_cache=False, **kw)
        assert torch.equal(seqs, fresh)  # a cache longer than the call needs changes nothing
        return mm._caches.last

    first = call(10, 4)
    assert first.layers[0].max_cache_len == 13
    assert call(8, 3) is first  # shorter: the same cache
    longer = call(12, 6)
    assert longer is not first and longer.layers[0].max_cache_len == 17
    assert call(10, 4) is longer and longer.layers[0].max_cache_len == 17  # never shrinks
    # a call left to HF's own cache (the expert given) gets the same length: the decode step keeps its shapes
    ids = torch.randint(3, 250, (2, 10))
    out = mm.generate(ids, torch.ones_like(ids), expert=torch.tensor([0, 1]), max_new_tokens=4, min_new_tokens=4,
                      return_dict_in_generate=True, **gen)[0]
    assert out.past_key_values.layers[0].max_cache_len == 17
    mm.model.to(torch.bfloat16)  # another dtype: a new cache (the old one's tensors would not take the new keys)
    again = call(10, 4)
    assert again is not longer and again.layers[0].keys.dtype == torch.bfloat16


@pytest.mark.parametrize("asks_hidden_states", [False, True])
def test_routing_pass_gives_generate_its_first_step(asks_hidden_states, tiny_cfg, tiny_base):
    """The routing pass ran the whole prompt, so generate's first token comes from its last position: the model runs
    once per later token only, with the tokens and scores of routing followed by a full prefill. A call that asks
    for hidden states (which only a real forward returns) gets generate's own first step instead."""
    mm = distinct_experts(tiny_cfg, tiny_base)
    ids = torch.randint(3, 250, (4, 10))
    mask = torch.ones_like(ids)
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True,
               return_dict_in_generate=True, output_hidden_states=asks_hidden_states)
    assert mm._head_is_plain()  # checked once per model (a two-token forward), before the calls are counted
    calls = []
    hook = mm.model.register_forward_pre_hook(lambda _m, args, kwargs: calls.append(kwargs["input_ids"].shape[1]),
                                              with_kwargs=True)
    try:
        reused, _ = mm.generate(ids, mask, **gen)
    finally:
        hook.remove()
    fresh, _ = mm.generate(ids, mask, reuse_routing_cache=False, **gen)
    assert calls == ([1] * 4 if asks_hidden_states else [1] * 3), calls
    assert torch.equal(reused.sequences, fresh.sequences)
    for a, b in zip(reused.scores, fresh.scores):
        assert torch.allclose(a, b, atol=1e-5)


def test_first_step_is_generates_own_when_the_model_scales_its_logits(tiny_cfg, tiny_base):
    """A model whose forward does more to its logits than the output embedding (Gemma-2's soft-capping, Cohere's
    logit_scale; here a hook that doubles them) gets generate's own first step: the same scores as a full prefill."""
    mm = distinct_experts(tiny_cfg, tiny_base)
    scale = mm.model.register_forward_hook(lambda _m, _args, out: type(out)(logits=out.logits * 2,
                                                                            past_key_values=out.past_key_values))
    ids = torch.randint(3, 250, (4, 10))
    mask = torch.ones_like(ids)
    gen = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0, output_scores=True,
               return_dict_in_generate=True)
    try:
        reused, _ = mm.generate(ids, mask, **gen)
        fresh, _ = mm.generate(ids, mask, reuse_routing_cache=False, **gen)
    finally:
        scale.remove()
    assert mm._plain_head is False
    for a, b in zip(reused.scores, fresh.scores):
        assert torch.allclose(a, b, atol=1e-5)


def test_beam_search_keeps_each_prompts_expert_on_its_beams(tiny_cfg, tiny_base):
    mm = distinct_experts(tiny_cfg, tiny_base)
    ids = torch.randint(3, 250, (4, 10))
    mask = torch.ones_like(ids)
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, num_beams=3, num_return_sequences=2)
    routed, expert = mm.generate(ids, mask, **gen)
    assert routed.shape == (8, 14) and expert.shape == (4,)
    for i in range(4):  # each prompt alone, its expert given: the same beams
        alone, _ = mm.generate(ids[i:i + 1], mask[i:i + 1], expert=expert[i:i + 1], **gen)
        assert torch.equal(alone, routed[2 * i:2 * i + 2])


def test_router_and_expert_list_mismatch_is_a_clear_error(tiny_cfg, tiny_base, tiny_model_dir, tmp_path):
    import json as _json

    from moa_core.model import load_mixture, save_mixture

    mm = build_mixture(tiny_cfg, "moa", tiny_base, "tiny")
    out = save_mixture(mm, tmp_path / "mix")
    meta = _json.loads((out / "mixture.json").read_text())
    meta["experts"] = meta["experts"] + ["law"]  # mixture.json now names one expert more than the routers hold
    meta["domains"] = meta["domains"] + ["law"]
    meta["experts_per_layer"] = [e + 1 for e in meta["experts_per_layer"]]
    (out / "mixture.json").write_text(_json.dumps(meta))
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(MixtureError, match="do not fit the spec's experts"):
        load_mixture(fresh, out)


def test_an_expert_index_out_of_range_is_a_clear_error_before_any_work(tiny_cfg, tiny_base):
    """generate(expert=...) and generate_greedy: the kernels index the stacked experts unchecked, so a caller's
    expert out of range, of the wrong length or of a float dtype is refused with the range to use."""
    mm = distinct_experts(tiny_cfg, tiny_base)
    ids = torch.randint(3, 250, (2, 5))
    mask = torch.ones_like(ids)
    n = len(mm.spec.experts)
    for bad, words in ((torch.tensor([0, n]), f"[0, {n})"), (torch.tensor([-1, 0]), f"[0, {n})"),
                       (torch.tensor([0]), "one index per prompt row (2)"), (torch.tensor([0.0, 1.0]), "integer")):
        with pytest.raises(ValueError, match=re.escape(words)):
            mm.generate(ids, mask, expert=bad, max_new_tokens=2, do_sample=False, pad_token_id=0)
        with pytest.raises(ValueError, match=re.escape(words)):
            mm.generate_greedy(ids, mask, 2, expert=bad)
    out, used = mm.generate(ids, mask, expert=torch.tensor([0, n - 1]), max_new_tokens=2, do_sample=False,
                            pad_token_id=0)
    assert out.shape == (2, 7) and used.tolist() == [0, n - 1]
