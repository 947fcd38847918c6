"""Gold-routed training with the rows in expert-major blocks, and the routers left out where nothing reads them."""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import toy_records
from moa_core.batching import balanced_batches, collate, encode, expert_blocks
from moa_core.experts import ExpertMixtureLinear, LayerSlot, Route
from moa_core.methods import build_mixture
from moa_core.train import train_mixture


@pytest.mark.parametrize("residual", [False, True])  # MoA's parallel experts; MoDULA-Res's, reading h
def test_blocked_experts_equal_gathered_ones_in_value_and_gradients(residual):
    """Block k of the rows through expert k's views == each row's gathered expert: output, dx, dA, dB."""
    torch.manual_seed(0)
    E, b, T = 3, 2, 5
    lin = torch.nn.Linear(6, 10)
    w = ExpertMixtureLinear(lin, LayerSlot(0), num_experts=E, r=4, scaling=2.0, dropout=0.2,
                            universal_r=3 if residual else 0)
    w.train()
    with torch.no_grad():
        torch.nn.init.normal_(w.lora_B)
        w.scaling.copy_(torch.tensor([0.5, 2.0, 3.0]))  # experts of different alpha / r
        if residual:
            torch.nn.init.normal_(w.universal_B)
    x0 = torch.randn(E * b, T, 6)
    index = torch.arange(E).repeat_interleave(b)
    got = {}
    for blocks in (False, True):
        w.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        w.slot.route = Route(index=index, blocks=blocks)
        torch.manual_seed(1)  # the same dropout mask on both paths
        y = w(x)
        (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
        got[blocks] = (y.detach(), x.grad, w.lora_A.grad.clone(), w.lora_B.grad.clone())
    assert got[False][2].abs().min() > 0 or residual, "every expert must get a gradient for the test to mean much"
    for a, c in zip(got[False], got[True], strict=True):
        torch.testing.assert_close(c, a, atol=1e-5, rtol=1e-5)
    calls = []
    w._gathered = lambda route: calls.append(route) or ExpertMixtureLinear._gathered(w, route)
    w.slot.route = Route(index=index, blocks=True)
    w(x0)
    assert calls == [], "the blocked path gathers nothing"


def _group(E: int, b: int, dropout: float):
    """q/k/v-like members (one input, outputs 8/4/4 wide, biases) of one layer, experts' B and scalings set."""
    from moa_core.lora_kernels import LoraGroup

    slot = LayerSlot(0)
    members = [ExpertMixtureLinear(torch.nn.Linear(6, n), slot, num_experts=E, r=3, scaling=2.0, dropout=dropout)
               for n in (8, 4, 4)]
    with torch.no_grad():
        for i, w in enumerate(members):
            w.base.requires_grad_(False)
            torch.nn.init.normal_(w.lora_B)
            w.scaling.copy_(torch.arange(1, E + 1) * (i + 1) / 4)
    group = LoraGroup(members)
    for w in members:
        w.fused_group = group
        w.train()
    slot.route = Route(index=torch.arange(E).repeat_interleave(b), blocks=True)
    return members, group


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_a_group_trains_its_members_at_once(dropout, monkeypatch):
    """lora_kernels.blocked_group == each member's own blocked forward (base + s B A dropout(x) per block), in value
    and in the gradients of x, A and B, given the same dropout masks; each member draws its own mask."""
    import moa_core.lora_kernels as lk

    torch.manual_seed(0)
    E, b, T = 3, 2, 4
    members, group = _group(E, b, dropout)
    group.stack_base()
    assert group.trains_blocked() and all(w._blocked_group_here() for w in members)
    x0 = torch.randn(E * b, T, 6)
    masks = []
    real_dropout = torch.nn.functional.dropout

    def recorded(t, p, training=True, inplace=False):
        out = real_dropout(t, p, training, inplace)
        masks.append(out != 0)
        return out
    monkeypatch.setattr(lk.torch.nn.functional, "dropout", recorded)
    x = x0.clone().requires_grad_()
    outs = [w(x) for w in members]  # q computes the group's outputs; k and v take theirs
    assert len(masks) == (1 if dropout else 0)
    sum((o * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in outs).backward()
    got = [x.grad] + [t.grad for w in members for t in (w.lora_A, w.lora_B)]
    # the reference: each member alone, its input dropped with its own mask from the group's draw
    for w in members:
        w.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_()
    want_outs = []
    for i, w in enumerate(members):
        xd = x if not dropout else x * masks[0][:, i].reshape(x.shape) / (1 - dropout)
        y = w.base(x)
        h = torch.bmm(xd.reshape(E, -1, 6), w.lora_A.transpose(1, 2))
        want_outs.append(torch.baddbmm(y.reshape(E, -1, y.shape[-1]), h,
                                       (w.lora_B * w.scaling.view(-1, 1, 1)).transpose(1, 2)).view(y.shape))
    sum((o * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in want_outs).backward()
    want = [x.grad] + [t.grad for w in members for t in (w.lora_A, w.lora_B)]
    for o, wo in zip(outs, want_outs, strict=True):
        torch.testing.assert_close(o, wo, atol=1e-5, rtol=1e-5)
    for g, wg in zip(got, want, strict=True):
        torch.testing.assert_close(g, wg, atol=1e-5, rtol=1e-5)
    if dropout:
        m = masks[0]  # [E, members, b*T, d_in]
        assert not torch.equal(m[:, 0], m[:, 1]) and not torch.equal(m[:, 1], m[:, 2]), "a mask per member"
        assert 0.3 < m.float().mean() < 0.7


def test_a_group_falls_back_to_its_members_where_it_may_not_run_them_together():
    members, group = _group(2, 1, 0.1)
    assert not group.trains_blocked(), "no stacked base weights yet: each member alone"
    group.stack_base()
    assert group.trains_blocked()
    members[1].dropout = torch.nn.Dropout(0.2)
    assert not group.trains_blocked(), "another dropout rate"
    members[1].dropout = torch.nn.Dropout(0.1)
    members[0].slot.route = Route(index=torch.arange(2), blocks=False)
    assert not members[0]._blocked_group_here(), "rows not in blocks"
    members[0].slot.route = Route(index=torch.arange(2), blocks=True)
    members[0].eval()
    assert not members[0]._blocked_group_here(), "inference"
    members[0].train()
    for w in members:
        w.dropout = torch.nn.Identity()
    x = torch.randn(2, 3, 6)
    before = [w(x).detach() for w in members]  # through the group (q computes, k and v take theirs)
    with torch.no_grad():  # a bias loaded in place (load_state_dict): the stacked bias follows
        members[0].base.bias += 1.0
    group.stack_base()
    after = [w(x).detach() for w in members]
    torch.testing.assert_close(after[0], before[0] + 1.0)
    torch.testing.assert_close(after[1], before[1])
    old = [w.base.weight.data_ptr() for w in members]
    for w in members:  # a move (here: a new dtype and back) gives each base weight its own storage again
        w.base.weight = torch.nn.Parameter(w.base.weight.detach().clone(), requires_grad=False)
    assert [w.base.weight.data_ptr() for w in members] != old
    group.stack_base()
    assert all(w.base.weight.data_ptr() == group.W[s].data_ptr() for w, s in zip(members, group.out_slices))


def _rows(tok, n_domains: int, per_domain: int):
    recs = toy_records(n_domains, per_domain)
    enc = [encode(tok, recs[k][i], 64) for k in range(n_domains) for i in range(per_domain)]
    return collate(enc, tok.pad_token_id, [k for k in range(n_domains) for _ in range(per_domain)])


def test_forward_with_expert_blocks_gives_the_same_loss_and_gradients(tiny_cfg, tiny_base, tiny_tok):
    """The whole model: blocks (q/k/v and gate/up as groups, o and down alone) against the gathers, dropout off (the
    groups draw their masks in another order: `test_a_group_trains_its_members_at_once` checks them)."""
    mm = build_mixture(tiny_cfg, "moa", tiny_base, "tiny")
    with torch.no_grad():
        for w in mm.wrapped.values():
            torch.nn.init.normal_(w.lora_B, std=0.05)
            w.dropout = torch.nn.Identity()
    mm.set_trainable(experts=True)
    mm.train()
    grouped = []
    for g in mm.lora_fusion.groups:
        g.blocked = lambda member, x, index, _g=g, _f=type(g).blocked: grouped.append(member) or _f(_g, member, x, index)
    E = len(tiny_cfg.domain_names)
    b = _rows(tiny_tok, E, 2)  # experts [0, 0, 1, 1, 2, 2, ...]
    results = []
    for blocks in (False, True):
        mm.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the experts' dropout draws the same masks on both paths
        out = mm(b["input_ids"], b["attention_mask"], labels=b["labels"], expert=b["expert"], expert_blocks=blocks)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in mm.named_parameters() if p.grad is not None}))
    assert {id(m) for m in grouped} == {id(w) for w in mm.wrapped.values() if len(w.fused_group.members) > 1}
    assert len(grouped) == sum(len(g.members) for g in mm.lora_fusion.groups if len(g.members) > 1)  # one forward
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=1e-6)
    assert results[0][1].keys() == results[1][1].keys() and results[0][1]
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="expert-major blocks"):
        mm(b["input_ids"], b["attention_mask"], labels=b["labels"], expert=b["expert"].flip(0), expert_blocks=True)
    with pytest.raises(ValueError, match="one equal block per expert"):
        k = 2 * E - 2
        mm(b["input_ids"][:k], b["attention_mask"][:k], labels=b["labels"][:k], expert=b["expert"][:k],
           expert_blocks=True)
    with pytest.raises(ValueError, match="gold expert per row"):
        mm(b["input_ids"], b["attention_mask"], labels=b["labels"], expert_blocks=True)


def test_routers_run_only_where_their_logits_are_read(tiny_cfg, tiny_base, tiny_tok):
    """Gold-routed without the routing loss (MoA stage 1 in one pass, the eta = 0 ablation, validation with the
    gold expert), the sequence routers' logits feed nothing: they are not computed. With the loss on, or a pool
    mask asked for, they are."""
    mm = build_mixture(tiny_cfg, "moa", tiny_base, "tiny")
    mm.train()
    calls = []
    for r in mm.routers:
        r.register_forward_hook(lambda *_: calls.append(1))
    b = _rows(tiny_tok, len(tiny_cfg.domain_names), 1)
    L = len(mm.routers)
    out = mm(b["input_ids"], b["attention_mask"], labels=b["labels"], expert=b["expert"])
    assert (calls, out.router_logits, out.aux_loss) == ([], [], None)
    out = mm(b["input_ids"], b["attention_mask"], labels=b["labels"], expert=b["expert"], eta=0.5)
    assert len(calls) == L and len(out.router_logits) == L and out.aux_loss > 0
    out = mm(b["input_ids"], b["attention_mask"], expert=b["expert"], pool_mask=b["attention_mask"])
    assert len(out.router_logits) == L
    out = mm(b["input_ids"], b["attention_mask"], labels=b["labels"])  # no gold expert: the routers decide
    assert len(out.router_logits) == L


def _domains(sizes: list[int]) -> list[list[dict[str, list[int]]]]:
    return [[{"input_ids": [100 * k + i, 7], "labels": [-100, 7]} for i in range(n)] for k, n in enumerate(sizes)]


@pytest.mark.parametrize("batch_size", [6, 4])
def test_expert_major_batches_hold_the_same_rows_ordered_by_domain(batch_size):
    data = _domains([5, 3, 4])
    plain = list(itertools.islice(balanced_batches(data, batch_size, seed=3, pad_id=0), 7))
    major = list(itertools.islice(balanced_batches(data, batch_size, seed=3, pad_id=0, expert_major=True), 7))
    for p, m in zip(plain, major, strict=True):
        order = torch.sort(p["expert"], stable=True).indices
        for key in ("input_ids", "attention_mask", "labels", "expert"):
            assert torch.equal(m[key], p[key][order])
        if expert_blocks(3, batch_size):  # what train_mixture reads before vouching for the layout
            assert torch.equal(m["expert"], torch.arange(3).repeat_interleave(batch_size // 3))
    assert expert_blocks(3, batch_size) == (batch_size == 6)
    resumed = next(balanced_batches(data, batch_size, seed=3, pad_id=0, start_step=5, expert_major=True))
    assert torch.equal(resumed["input_ids"], major[5]["input_ids"])


def test_moving_the_model_drops_the_groups_stale_stacked_weights(tiny_cfg, tiny_base, tiny_tok):
    mm = build_mixture(tiny_cfg, "moa", tiny_base, "tiny")
    mm.train()
    b = _rows(tiny_tok, len(tiny_cfg.domain_names), 1)
    mm(b["input_ids"], b["attention_mask"], labels=b["labels"], expert=b["expert"], expert_blocks=True)
    stacked = [g for g in mm.lora_fusion.groups if g.W is not None]
    assert stacked, "the blocked step stacked the groups' base weights"
    mm.to(torch.float64)
    assert all(g.W is None and g.bias is None and g.A is None for g in mm.lora_fusion.groups), "no stale fp32 copy"
    out = mm(b["input_ids"], b["attention_mask"], labels=b["labels"], expert=b["expert"], expert_blocks=True)
    assert out.logits.dtype == torch.float64 and all(g.W.dtype == torch.float64 for g in stacked)
    mm.to(torch.float64)  # no move: the copies stay
    assert all(g.W is not None for g in stacked)


def test_training_in_blocks_trains_the_experts_the_gathered_path_trains(tiny_cfg, tiny_model_dir, tiny_tok, monkeypatch):
    """train_mixture end to end (routers and their loss on, per-expert clip, AdamW), dropout off: the blocked groups
    and the gathers give the same experts and routers."""
    import moa_core.train as train
    from transformers import AutoModelForCausalLM

    cfg = tiny_cfg.model_copy(update={"train": tiny_cfg.train.model_copy(update={"batch_size": 8}),
                                      "lora": tiny_cfg.lora.model_copy(update={"dropout": 0.0})})
    trained = []
    for blocks in (True, False):
        monkeypatch.setattr(train, "expert_blocks", lambda n, bs, _b=blocks: _b and bs % n == 0)
        torch.manual_seed(0)
        mm = build_mixture(cfg, "moa", AutoModelForCausalLM.from_pretrained(tiny_model_dir), "tiny")
        with torch.no_grad():
            for w in mm.wrapped.values():
                torch.nn.init.normal_(w.lora_B, std=0.05)
        calls = []
        for g in mm.lora_fusion.groups:
            g.blocked = lambda member, x, index, _g=g, _f=type(g).blocked: calls.append(1) or _f(_g, member, x, index)
        train_mixture(mm, tiny_tok, toy_records(len(cfg.domain_names), 6), cfg, steps=4, lr=1e-2, train_experts=True,
                      train_routers=True, eta=0.1)
        assert bool(calls) == blocks
        trained.append({n: p.detach().clone() for n, p in mm.mixture_parameters().items()})
    moved = max(float((trained[0][n] - trained[1][n]).abs().max()) for n in trained[0])
    assert moved < 1e-4, moved
    start = build_mixture(cfg, "moa", AutoModelForCausalLM.from_pretrained(tiny_model_dir), "tiny")
    assert any(float((trained[0][n] - p.detach()).abs().max()) > 1e-3 for n, p in start.mixture_parameters().items()
               if "routers" in n), "the runs trained"


@pytest.mark.parametrize("batch_size,blocked", [(8, True), (6, False)])
def test_gold_routed_training_takes_the_blocked_path_when_the_experts_divide_the_batch(
        tiny_cfg, tiny_base, tiny_tok, monkeypatch, batch_size, blocked):
    cfg = tiny_cfg.model_copy(update={"train": tiny_cfg.train.model_copy(update={"batch_size": batch_size})})
    mm = build_mixture(cfg, "moa", tiny_base, "tiny")
    seen = []
    real = ExpertMixtureLinear._blocked
    monkeypatch.setattr(ExpertMixtureLinear, "_blocked", lambda self, x, y: seen.append(x.shape[0]) or real(self, x, y))
    res = train_mixture(mm, tiny_tok, toy_records(len(cfg.domain_names), 6), cfg, steps=2, lr=1e-2, train_experts=True,
                        train_routers=False)
    assert res.final_loss == res.final_loss  # finite, trained
    assert bool(seen) == blocked
    assert set(seen) <= {batch_size}
