"""The fused routed-LoRA path (moa_core.lora_kernels) against the reference path (ExpertMixtureLinear's own code).

On the CPU the fused path runs its torch formulation through the `moa::routed_lora` custom op (what the
Triton kernel computes on CUDA); `LoraFusion.enabled = True` turns it on here. The Triton kernel itself is
checked against that formulation where triton can run: on CUDA, or on the CPU under TRITON_INTERPRET=1."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import distinct_experts
from moa_core import lora_kernels
from moa_core.experts import Route


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the fused path's kernel calls (any custom op: `run_group`, `run_linear`, `run_augment`) and still runs
    them."""
    calls = []
    for name in ("run_group", "run_linear", "run_augment"):
        real = getattr(lora_kernels, name)

        def counting(*args, _real=real, _name=name):
            calls.append((_name, args[0].shape))
            return _real(*args)

        monkeypatch.setattr(lora_kernels, name, counting)
    return calls


@pytest.mark.parametrize("layout", [*lora_kernels.DECODE_LAYOUTS, "augmented-beyond-reach"])
def test_fused_formulation_equals_reference_path(tiny_cfg, tiny_base, op_calls, monkeypatch, layout):
    """Forward, forced and routed generation: the fused path in each decode layout (on the CPU their torch
    formulations: "merged" computes the base projections in its own op, "augmented" its input to one linear; a
    group beyond AUGMENT_MAX_EXTRA takes the merged layout's op instead) gives the reference path's results."""
    if layout == "augmented-beyond-reach":
        layout = "augmented"
        monkeypatch.setattr(lora_kernels, "AUGMENT_MAX_EXTRA", 0)
    monkeypatch.setattr(lora_kernels, "DECODE_LAYOUT", layout)
    mm = distinct_experts(tiny_cfg, tiny_base)
    ids = torch.randint(3, 250, (6, 9))
    mask = torch.ones_like(ids)
    ids[:2, :3], mask[:2, :3] = 0, 0
    expert = torch.tensor([0, 1, 2, 2, 0, 1])
    gen = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True,
               return_dict_in_generate=True)
    results = {}
    for fused in (False, True):
        mm.lora_fusion.enabled = fused
        with torch.no_grad():
            logits = mm(ids, mask, expert=expert).logits
        forced, _ = mm.generate(ids, mask, expert=expert, **gen)
        routed, chosen = mm.generate(ids, mask, **gen)
        results[fused] = (logits, forced, routed, chosen)
        if not fused:
            assert op_calls == [], "the reference path must not touch the kernels"
    assert op_calls, "the fused path was not taken"
    decode_op = {"merged": "run_linear", "augmented": "run_augment" if lora_kernels.AUGMENT_MAX_EXTRA else "run_linear"}
    assert {name for name, _ in op_calls} == {"run_group", decode_op.get(layout, "run_group")}
    (l0, f0, r0, c0), (l1, f1, r1, c1) = results[False], results[True]
    assert torch.allclose(l0, l1, atol=1e-5, rtol=1e-5), float((l0 - l1).abs().max())
    assert torch.equal(c0, c1)
    for ref, new in ((f0, f1), (r0, r1)):
        assert torch.equal(ref.sequences, new.sequences)
        for a, b in zip(ref.scores, new.scores):
            finite = torch.isfinite(a)
            assert torch.equal(finite, torch.isfinite(b)) and torch.allclose(a[finite], b[finite], atol=1e-5)


@pytest.mark.parametrize("prompt_layout", lora_kernels.PROMPT_LAYOUTS)
def test_prompt_layouts_equal_the_reference_path(tiny_cfg, tiny_base, op_calls, monkeypatch, prompt_layout):
    """A prompt pass (9 tokens, left-padded rows, mixed experts) in each prompt layout gives the reference path's
    logits, and routed generation its experts and tokens. "merged" runs each group as one base GEMM, one shrink and
    an in-place expand per member (`merged_prompt`, 4 per layer), never the group kernel on a prompt."""
    monkeypatch.setattr(lora_kernels, "PROMPT_LAYOUT", prompt_layout)
    merged_calls = []
    real = lora_kernels.merged_prompt
    monkeypatch.setattr(lora_kernels, "merged_prompt", lambda *a: merged_calls.append(a[0].shape) or real(*a))
    mm = distinct_experts(tiny_cfg, tiny_base)
    ids = torch.randint(3, 250, (6, 9))
    mask = torch.ones_like(ids)
    ids[:2, :3], mask[:2, :3] = 0, 0
    expert = torch.tensor([0, 1, 2, 2, 0, 1])
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    results = {}
    for fused in (False, True):
        mm.lora_fusion.enabled = fused
        merged_calls.clear()
        op_calls.clear()
        with torch.no_grad():
            logits = mm(ids, mask, expert=expert).logits
        prompt_ops = [name for name, shape in op_calls if shape[1] > 1]
        if fused and prompt_layout == "merged":
            assert len(merged_calls) == 4 * len(mm.slots) and prompt_ops == []
        elif fused:
            assert merged_calls == [] and prompt_ops == ["run_group"] * (4 * len(mm.slots))
        else:
            assert merged_calls == [] and prompt_ops == []
        results[fused] = (logits, *mm.generate(ids, mask, **gen))
    (l0, s0, c0), (l1, s1, c1) = results[False], results[True]
    assert torch.allclose(l0, l1, atol=1e-5, rtol=1e-5), float((l0 - l1).abs().max())
    assert torch.equal(c0, c1) and torch.equal(s0, s1)


def test_projections_sharing_an_input_take_one_kernel_call(tiny_cfg, tiny_base, op_calls):
    """q/k/v share one shrink and one call, gate/up another; o and down one each: 4 calls per layer."""
    mm = distinct_experts(tiny_cfg, tiny_base)
    mm.lora_fusion.enabled = True
    sizes = sorted(len(g.members) for g in mm.lora_fusion.groups)
    n_layers = len(mm.slots)
    assert sizes == [1] * (2 * n_layers) + [2] * n_layers + [3] * n_layers
    ids = torch.randint(3, 250, (4, 7))
    with torch.no_grad():
        mm(ids, torch.ones_like(ids), expert=torch.tensor([1, 0, 2, 1]))
    assert len(op_calls) == 4 * n_layers
    assert all(g.stash is None for g in mm.lora_fusion.groups), "a group kept its input after all members ran"


def test_merged_layout_runs_a_decode_step_without_the_base_linears(tiny_cfg, tiny_base, op_calls, monkeypatch):
    """In the merged layout a decode step's projections are 4 group calls per layer, base included: no member runs
    its own linear (on the CPU each group op runs one F.linear of the stacked W: 4 per layer where the split layout
    runs the 7 members' own); the members' base weights became views of their group's W (no copy, same values)."""
    mm = distinct_experts(tiny_cfg, tiny_base)
    mm.lora_fusion.enabled = True
    before = {n: w.base.weight.detach().clone() for n, w in mm.wrapped.items()}
    linear_calls = []
    real_linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: linear_calls.append(a[1].shape) or real_linear(*a))
    ids = torch.randint(3, 250, (4, 1))
    counts = {}
    for layout in ("split", "merged"):
        monkeypatch.setattr(lora_kernels, "DECODE_LAYOUT", layout)
        op_calls.clear()
        linear_calls.clear()
        with torch.no_grad():
            mm(ids, torch.ones_like(ids), expert=torch.tensor([1, 0, 2, 1]))
        counts[layout] = len(linear_calls)
    n_layers = len(mm.slots)
    assert [name for name, _ in op_calls] == ["run_linear"] * (4 * n_layers)
    assert counts["merged"] == counts["split"] - 3 * n_layers, counts
    for g in mm.lora_fusion.groups:
        for m, ns in zip(g.members, g.out_slices):
            assert m.base.weight.data_ptr() == g.W[ns].data_ptr(), "a member's weight is a copy, not a view of W"
    assert all(torch.equal(w.base.weight, before[n]) for n, w in mm.wrapped.items())


def test_training_and_grad_mode_keep_the_reference_path(tiny_cfg, tiny_base, op_calls):
    mm = distinct_experts(tiny_cfg, tiny_base)
    mm.lora_fusion.enabled = True
    ids = torch.randint(3, 250, (2, 5))
    mm(ids, torch.ones_like(ids), labels=ids, expert=torch.tensor([0, 1])).loss.backward()  # eval, grad on
    mm.train()
    with torch.no_grad():
        mm(ids, torch.ones_like(ids), expert=torch.tensor([0, 1]))
    assert op_calls == []


def test_refresh_keeps_the_stacked_weights_addresses_while_their_shapes_hold(tiny_cfg, tiny_base):
    """A captured CUDA graph reads the stacked A, B and Bt at fixed addresses: an expert changed in place is copied
    into them; a new expert (new shapes) gives new tensors."""
    mm = distinct_experts(tiny_cfg, tiny_base)
    mm.lora_fusion.enabled = True
    assert mm.lora_fusion.ready()
    g = mm.lora_fusion.groups[0]
    addresses = [t.data_ptr() for t in (g.A, g.B, g.Bt)]
    with torch.no_grad():
        g.members[0].lora_B[1].add_(1.0)
    assert mm.lora_fusion.ready()
    assert [t.data_ptr() for t in (g.A, g.B, g.Bt)] == addresses
    scaled = g.members[0].lora_B[1] * g.members[0].scaling[1]
    assert torch.equal(g.Bt[1, :, :g.members[0].out_features], scaled.t())
    for w in mm.wrapped.values():
        w.add_expert()
    assert mm.lora_fusion.ready()
    assert all(t.data_ptr() != a for t, a in zip((g.A, g.B, g.Bt), addresses))
    assert g.A.shape[0] == g.B.shape[0] == g.Bt.shape[0] == g.members[0].num_experts


def test_a_folded_expert_gives_each_member_its_routed_output_from_one_weight(tiny_cfg, tiny_base):
    """LoraGroup.fold: every member's columns of x @ W_folded^T are its base output plus expert e's LoRA delta (the
    reference path's, forced to e), fp32; a refold to another expert writes the same tensor (a captured step keeps
    reading it)."""
    mm = distinct_experts(tiny_cfg, tiny_base, std=0.3)
    mm.lora_fusion.enabled = True
    assert mm.lora_fusion.ready() and mm.lora_fusion.foldable(len(mm.wrapped))
    g = max(mm.lora_fusion.groups, key=lambda g: len(g.members))  # q/k/v
    x = torch.randn(3, 2, g.members[0].in_features)
    address = None
    for e in (1, 0):
        mm.lora_fusion.fold(e)
        assert g.folded_expert == e and address in (None, g.W_folded.data_ptr())
        address = g.W_folded.data_ptr()
        for m in g.members:
            m.slot.route = Route(index=torch.full((3,), e))
            with torch.no_grad():
                ref = m(x)
                m.slot.folded = True
                folded = m(x)
                m.slot.folded = False
            assert torch.allclose(folded, ref, atol=1e-5), (e, float((folded - ref).abs().max()))
            assert not torch.allclose(ref, torch.nn.functional.linear(x, m.base.weight, m.base.bias), atol=1e-3)


# every group on the Triton GEMM's formulation, or on cuBLAS's; or the augmented layout's one linear
@pytest.mark.parametrize("layout,max_fused_weight", [("merged", 2 ** 21), ("merged", 0), ("augmented", 2 ** 21)])
def test_merged_layout_with_biased_projections_equals_reference_path(tiny_cfg, op_calls, monkeypatch, layout,
                                                                     max_fused_weight):
    """Qwen2's q/k/v carry biases (the benchmarks' shape does not): the merged and augmented layouts stack them with
    the weights. A Llama with biases on every projection: forward, forced and routed generation as the reference path
    gives them, on each of the merged layout's two paths and the augmented one; the base model's own output is
    unchanged by the stacking."""
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setattr(lora_kernels, "DECODE_LAYOUT", layout)
    monkeypatch.setitem(lora_kernels.MERGED_CONFIG, "max_fused_weight", max_fused_weight)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                                        mlp_bias=True)).eval()
    with torch.no_grad():
        for mod in base.modules():
            if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
                mod.bias.normal_(std=0.5)
    ids = torch.randint(3, 250, (4, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        plain = base(input_ids=ids, attention_mask=mask).logits
    mm = distinct_experts(tiny_cfg, base)
    expert = torch.tensor([2, 0, 1, 2])
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True,
               return_dict_in_generate=True)
    results = {}
    for fused in (False, True):
        mm.lora_fusion.enabled = fused
        forced, _ = mm.generate(ids, mask, expert=expert, **gen)
        with torch.no_grad():
            off = mm(ids, mask, adapters_off=True).logits
        results[fused] = forced
    assert any(g.bias is not None for g in mm.lora_fusion.groups), "no group stacked biases"
    ran = {"merged": "run_linear", "augmented": "run_augment"}[layout]
    assert ran in {name for name, _ in op_calls}, f"the {layout} layout did not run"
    torch.testing.assert_close(off, plain)  # the base's own output, after its weights became views of W
    assert torch.equal(results[False].sequences, results[True].sequences)
    for a, b in zip(results[False].scores, results[True].scores):
        finite = torch.isfinite(a)
        assert torch.allclose(a[finite], b[finite], atol=1e-5)


@pytest.mark.parametrize("tokens,layout", [(6, "merged"), (1, "merged"), (1, "augmented")])
def test_stacked_weights_follow_expert_changes(tiny_cfg, tiny_base, monkeypatch, tokens, layout):
    """The kernels read copies of the experts (stacked per group): loading or changing an expert in place,
    or adding one, must reach them before the next forward (tokens = 1: a decode step, in the merged layout, or in
    the augmented one, whose Wa holds the experts' B beside the base weights)."""
    monkeypatch.setattr(lora_kernels, "DECODE_LAYOUT", layout)
    mm = distinct_experts(tiny_cfg, tiny_base)
    ids = torch.randint(3, 250, (3, tokens))
    mask = torch.ones_like(ids)
    expert = torch.tensor([0, 1, 2])

    def both():
        out = {}
        for fused in (False, True):
            mm.lora_fusion.enabled = fused
            with torch.no_grad():
                out[fused] = mm(ids, mask, expert=expert).logits
        return out[False], out[True]

    before = both()[1]
    w = next(w for n, w in mm.wrapped.items() if n.endswith("up_proj"))  # (one token's attention ignores q)
    w.load_expert(1, torch.randn(w.r, w.in_features), torch.randn(w.out_features, w.r), 3.0)
    ref, new = both()
    assert not torch.allclose(before, new, atol=1e-3), "the loaded expert was not used"
    assert torch.allclose(ref, new, atol=1e-5)
    with torch.no_grad():
        for v in mm.wrapped.values():
            v.lora_B[2].mul_(2.0)
    ref, new2 = both()
    assert not torch.allclose(new, new2, atol=1e-3), "the expert changed in place was not used"
    assert torch.allclose(ref, new2, atol=1e-5)
    mm.add_expert("delta")
    with torch.no_grad():
        for v in mm.wrapped.values():
            v.lora_B[3].normal_(std=0.2)
    expert = torch.tensor([3, 1, 3])
    ref, new = both()
    assert torch.allclose(ref, new, atol=1e-5)


@pytest.mark.parametrize("backend,layout", [("aot_eager", "split"), ("aot_eager", "merged"), ("aot_eager", "augmented"),
                                            pytest.param("inductor", "merged", marks=pytest.mark.optin)])
def test_fused_path_compiled_with_a_static_cache_matches_eager(tiny_cfg, tiny_base, monkeypatch, backend, layout):
    """HF's compiled decode step (static cache, torch.compile fullgraph) through the custom op: the same tokens as
    the reference path run eagerly, also after the number of distinct experts in the batch changes (no re-trace
    of the routing: the expert per row is a fixed-shape graph input).

    aot_eager (default run): dynamo's full-graph trace and AOTAutograd, i.e. the custom op's fake implementation
    and functionalization, the graph inductor is handed. inductor (opt-in, `-m optin`): the same graph through
    inductor's C++ code generation as well, about 30 s on a cold compile cache on a 2-core CPU runner."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(lora_kernels, "DECODE_LAYOUT", layout)
    mm = distinct_experts(tiny_cfg, tiny_base)
    ids = torch.randint(3, 250, (6, 8))
    mask = torch.ones_like(ids)
    cc = CompileConfig(mode="default", fullgraph=True, backend=backend)
    cc._compile_all_devices = True  # HF compiles on accelerators only unless told
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    for expert in (torch.tensor([0, 1, 2, 0, 1, 2]), torch.zeros(6, dtype=torch.long), torch.tensor([2, 2, 1, 1, 2, 2])):
        mm.lora_fusion.enabled = False
        ref, _ = mm.generate(ids, mask, expert=expert, **gen)
        mm.lora_fusion.enabled = True
        new, _ = mm.generate(ids, mask, expert=expert, cache_implementation="static", compile_config=cc, **gen)
        assert torch.equal(ref, new), expert
    assert counters["stats"]["unique_graphs"] >= 1, "the decode step was not compiled"


@pytest.mark.skipif(not lora_kernels.HAVE_TRITON or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET")),
                    reason="needs triton on CUDA, or TRITON_INTERPRET=1")
@pytest.mark.parametrize("T", [1, 5, 70])
@pytest.mark.parametrize("with_y", [False, True])
@pytest.mark.parametrize("K,R", [(96, 24), (2500, 8)])  # one K block; several, with a partial last one
def test_triton_kernel_matches_the_torch_formulation(T, with_y, K, R):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])  # the interpreter has no bf16
    for dtype in dtypes:
        g = torch.Generator().manual_seed(T)
        Bsz, N, E = 5, 200, 4
        x = torch.randn(Bsz, T, K, generator=g).to(device, dtype)
        A = torch.randn(E, R, K, generator=g).to(device, dtype)
        B = (0.1 * torch.randn(E, N, R, generator=g)).to(device, dtype)
        y = torch.randn(Bsz, T, N, generator=g).to(device, dtype) if with_y else None
        index = torch.tensor([3, 0, 3, 1, 2], device=device)
        ref = lora_kernels.routed_lora_torch(x.double(), A.double(), B.double(), index, None if y is None else y.double())
        for split in [False, True] if T == 1 else [False]:  # a decode step's "fused" and "split" layouts
            out = lora_kernels.routed_lora_triton(x, A, B, index, y, split)
            err = float((out.double() - ref).norm() / ref.norm())
            assert err < (1e-5 if dtype == torch.float32 else 1e-2), (dtype, split, err)


@pytest.mark.skipif(not lora_kernels.HAVE_TRITON or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET")),
                    reason="needs triton on CUDA, or TRITON_INTERPRET=1")
@pytest.mark.parametrize("Bsz", [1, 5, 40])  # one row (15 of the 16 masked), a partial tile, two row tiles
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("K,outs,r", [(96, (80, 24, 24), 8), (2500, (300,), 16), (64, (200, 72), 4)])
def test_merged_kernel_matches_the_torch_formulation(Bsz, with_bias, K, outs, r):
    """The merged layout's GEMM with the routed expand, 1-3 members of any widths (tiles straddle members)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
    for dtype in dtypes:
        g = torch.Generator().manual_seed(Bsz + K)
        E, N, R = 4, sum(outs), r * len(outs)
        x = torch.randn(Bsz, 1, K, generator=g).to(device, dtype)
        W = (torch.randn(N, K, generator=g) / K ** 0.5).to(device, dtype)
        bias = torch.randn(N, generator=g).to(device, dtype) if with_bias else None
        A = (torch.randn(E, R, K, generator=g) / K ** 0.5).to(device, dtype)
        Bt = torch.randn(E, r, N, generator=g).to(device, dtype)
        index = torch.randint(0, E, (Bsz,), generator=g).to(device)
        bounds = list(torch.tensor(outs).cumsum(0)[:-1].tolist())
        as64 = [t.double() if t is not None else None for t in (x, W, bias, A, Bt)]
        ref = lora_kernels.routed_linear_torch(*as64, index, bounds)
        out = lora_kernels.routed_linear_triton(x, W, bias, A, Bt, index, bounds)
        err = float((out.double() - ref).norm() / ref.norm())
        assert err < (1e-5 if dtype == torch.float32 else 1e-2), (dtype, err)


@pytest.mark.skipif(not lora_kernels.HAVE_TRITON or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET")),
                    reason="needs triton on CUDA, or TRITON_INTERPRET=1")
@pytest.mark.parametrize("Bsz", [1, 5])
@pytest.mark.parametrize("K,E,R", [(96, 4, 24), (2500, 3, 16), (40, 8, 4)])  # x in one span or several; slots across spans
def test_augment_kernel_matches_the_torch_formulation(Bsz, K, E, R):
    """The augmented layout's input kernel: x, then every expert's slot zero but each row's own, which holds its
    shrink; and the one linear over it equals the merged layout's formulation (base + routed LoRA)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
    for dtype in dtypes:
        g = torch.Generator().manual_seed(Bsz + K)
        x = torch.randn(Bsz, 1, K, generator=g).to(device, dtype)
        A = (torch.randn(E, R, K, generator=g) / K ** 0.5).to(device, dtype)
        index = torch.randint(0, E, (Bsz,), generator=g).to(device)
        ref = lora_kernels.augment_torch(x.double(), A.double(), index)
        out = lora_kernels.augment_triton(x, A, index)  # every column checked below: x, zero slots, the row's own
        assert out.shape == ref.shape
        assert torch.equal(out[..., :K], x)
        slots = out[..., K:].view(Bsz, E, R).double()
        for b in range(Bsz):
            e = int(index[b])
            assert not slots[b, torch.arange(E) != e].any(), "another expert's slot is not zero"
            err = float((slots[b, e] - ref[b, 0, K:].view(E, R)[e]).norm() / ref[b, 0, K:].norm())
            assert err < (1e-5 if dtype == torch.float32 else 1e-2), (dtype, err)


def test_augmented_weights_hold_the_base_weights_and_the_experts(tiny_cfg, tiny_base, monkeypatch):
    """The augmented layout's Wa [N, K + E R]: the members' base weights are views of its first K columns (no second
    copy), expert e's block-diagonal s B fills columns K + e R...; an expert changed in place is written into the same
    tensor (a captured step keeps reading it). Beyond AUGMENT_MAX_EXTRA, or under another layout, no group takes it,
    yet Wa stays (a switch back replays over the same tensor) until a rebuild under that layout drops it."""
    monkeypatch.setattr(lora_kernels, "DECODE_LAYOUT", "augmented")
    mm = distinct_experts(tiny_cfg, tiny_base)
    mm.lora_fusion.enabled = True
    assert mm.lora_fusion.ready()
    for g in mm.lora_fusion.groups:
        E, N, R = g.B.shape
        K = g.A.shape[2]
        assert g.Wa is not None and g.Wa.shape == (N, K + E * R)
        for m, ns in zip(g.members, g.out_slices):
            assert m.base.weight.data_ptr() == g.Wa[ns].data_ptr() and torch.equal(m.base.weight, g.Wa[ns, :K])
        for e in range(E):
            assert torch.equal(g.Wa[:, K + e * R:K + (e + 1) * R], g.B[e])
    # the reach: E R N elements of experts' columns (B's size), at most AUGMENT_MAX_EXTRA
    biggest = max(mm.lora_fusion.groups, key=lambda g: g.B.numel())
    assert biggest.A.shape[1] > 1
    monkeypatch.setattr(lora_kernels, "AUGMENT_MAX_EXTRA", biggest.B.numel())
    assert all(g.augments() for g in mm.lora_fusion.groups)
    monkeypatch.setattr(lora_kernels, "AUGMENT_MAX_EXTRA", biggest.B.numel() - 1)
    assert not biggest.augments() and any(g.augments() for g in mm.lora_fusion.groups)
    monkeypatch.setattr(lora_kernels, "AUGMENT_MAX_EXTRA", 2 ** 22)
    g = mm.lora_fusion.groups[0]
    address = g.Wa.data_ptr()
    with torch.no_grad():
        g.members[0].lora_B[1].add_(1.0)
    assert mm.lora_fusion.ready() and g.Wa.data_ptr() == address
    K, R = g.A.shape[2], g.A.shape[1]
    assert torch.equal(g.Wa[:, K + R:K + 2 * R], g.B[1])
    monkeypatch.setattr(lora_kernels, "AUGMENT_MAX_EXTRA", 0)
    assert mm.lora_fusion.ready() and not any(g.augments() for g in mm.lora_fusion.groups)
    monkeypatch.setattr(lora_kernels, "AUGMENT_MAX_EXTRA", 2 ** 22)
    monkeypatch.setattr(lora_kernels, "DECODE_LAYOUT", "merged")
    assert mm.lora_fusion.ready() and not any(g.augments() for g in mm.lora_fusion.groups)
    monkeypatch.setattr(lora_kernels, "DECODE_LAYOUT", "augmented")
    assert mm.lora_fusion.ready() and g.augments() and g.Wa.data_ptr() == address
    monkeypatch.setattr(lora_kernels, "DECODE_LAYOUT", "merged")
    with torch.no_grad():
        g.members[0].lora_B[0].add_(1.0)
    assert mm.lora_fusion.ready() and g.Wa is None, "a rebuild under another layout kept stale expert columns"


def test_decode_layout_flag_is_a_compile_guard(monkeypatch):
    """`DECODE_LAYOUT` is read where torch.compile traces: changing it compiles the other layout (its own graph,
    so under CUDA graphs its own capture) instead of replaying the first one, and changing it back reuses it."""
    seen: list[bool] = []
    real = lora_kernels._routed_lora_impl
    monkeypatch.setattr(lora_kernels, "_routed_lora_impl", lambda *a: seen.append(a[-1]) or real(*a))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(lambda x, A, B, i: lora_kernels.run_group(x, A, B, i) * 2, backend=backend, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    x, A, B = torch.randn(2, 1, 8, generator=g), torch.randn(3, 4, 8, generator=g), torch.randn(3, 6, 4, generator=g)
    index = torch.tensor([0, 2])
    want = lora_kernels.routed_lora_torch(x, A, B, index) * 2
    for layout in ("fused", "split", "fused"):
        monkeypatch.setattr(lora_kernels, "DECODE_LAYOUT", layout)
        assert torch.allclose(step(x, A, B, index), want)
    assert len(graphs) == 2, "the flag did not recompile, or flipping it back compiled a third time"
    assert seen[-3:] == [False, True, False], seen
    torch._dynamo.reset()


def test_prompts_of_other_lengths_reuse_the_compiled_decode_step(tiny_cfg, tiny_base):
    """The static cache keeps its length across calls of one batch size (never shorter than the last), so prompts of
    other lengths run the decode step traced for the first call: traced once, with eager generation's tokens."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    torch._dynamo.reset()
    counters.clear()
    mm = distinct_experts(tiny_cfg, tiny_base)
    cc = CompileConfig(mode="default", fullgraph=True, backend="eager")  # dynamo alone: what is traced is tested
    cc._compile_all_devices = True
    gen = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    for prompt in (10, 7, 10):
        ids = torch.randint(3, 250, (4, prompt))
        mask = torch.ones_like(ids)
        eager, _ = mm.generate(ids, mask, **gen)
        out, _ = mm.generate(ids, mask, cache_implementation="static", compile_config=cc, **gen)
        assert torch.equal(out, eager), prompt
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    torch._dynamo.reset()


def test_routing_pass_compiles_only_when_asked(tiny_cfg, tiny_base, monkeypatch):
    """Routed generation with HF's compiled static-cache decode asks for a compiled routing pass, unless
    `compile_routing_pass` is False; the tokens are eager generation's either way, and the decode step is traced
    once for both calls (generate's first step comes from the routing pass, so the routes it would have left set
    are preset). (The routing pass itself runs eagerly here: compiling it is inductor's C++ build on the CPU,
    about 30 s.)"""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    torch._dynamo.reset()
    counters.clear()
    mm = distinct_experts(tiny_cfg, tiny_base)
    asked = []
    real = mm._run_decoder  # the routing pass and its re-run of rows whose layers disagreed
    monkeypatch.setattr(mm, "_run_decoder", lambda ids, mask, use_cache, compiled: asked.append(compiled)
                        or real(ids, mask, use_cache, False))
    ids = torch.randint(3, 250, (4, 8))
    mask = torch.ones_like(ids)
    cc = CompileConfig(mode="default", fullgraph=True, backend="eager")  # dynamo alone: the flag is what is tested
    cc._compile_all_devices = True
    gen = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    eager, chosen = mm.generate(ids, mask, **gen)
    for compile_routing in (False, True):
        mm.compile_routing_pass = compile_routing
        asked.clear()
        out, routed = mm.generate(ids, mask, cache_implementation="static", compile_config=cc, **gen)
        assert asked and set(asked) == {compile_routing}, asked
        assert torch.equal(routed, chosen) and torch.equal(out, eager)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    torch._dynamo.reset()


def test_merged_prompt_layout_runs_under_autocast(tiny_cfg, tiny_base, monkeypatch):
    """Evaluation under `train.precision: bf16` runs the fused path under autocast: the merged prompt layout's in-place
    expand must take the bf16 activations with the float32 experts, as the group kernel's path does."""
    mm = distinct_experts(tiny_cfg, tiny_base)
    mm.lora_fusion.enabled = True
    ids = torch.randint(3, 250, (3, 7))
    expert = torch.tensor([0, 2, 1])
    logits = {}
    for layout in lora_kernels.PROMPT_LAYOUTS:
        monkeypatch.setattr(lora_kernels, "PROMPT_LAYOUT", layout)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits[layout] = mm(ids, torch.ones_like(ids), expert=expert).logits.float()
    gap = float((logits["merged"] - logits["fused"]).abs().max())
    assert torch.allclose(logits["merged"], logits["fused"], atol=0.1), gap


def test_the_fold_follows_a_new_dtype_and_refresh_works_in_and_out_of_inference_mode(tiny_cfg, tiny_base):
    """After the model moves to another dtype the fold is made again in it (a copy into the old tensor would keep the
    old dtype and fail in F.linear); the stacked weights built under inference mode can be refreshed outside it;
    `unfold` frees the folded weights."""
    mm = distinct_experts(tiny_cfg, tiny_base, std=0.3)
    mm.lora_fusion.enabled = True
    with torch.inference_mode():
        assert mm.lora_fusion.ready()
        mm.lora_fusion.fold(1)
    g = mm.lora_fusion.groups[0]
    with torch.no_grad():
        g.members[0].lora_B.add_(0.1)  # in place, outside inference mode: the stacked weights are refreshed
    assert mm.lora_fusion.ready() and not g.A.requires_grad and not g.A.is_inference()
    mm.to(torch.float64)
    assert mm.lora_fusion.ready()
    mm.lora_fusion.fold(1)
    assert g.W_folded.dtype == torch.float64 and g.folded_expert == 1
    x = torch.randn(2, 1, g.members[0].in_features, dtype=torch.float64)
    m = g.members[0]
    m.slot.route = Route(index=torch.tensor([1, 1]))
    with torch.no_grad():
        ref = m(x)
        m.slot.folded = True
        folded = m(x)
        m.slot.folded = False
    assert torch.allclose(folded, ref, atol=1e-9)
    mm.lora_fusion.unfold()
    assert all(g.W_folded is None and g.folded_expert is None for g in mm.lora_fusion.groups)
