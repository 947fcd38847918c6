"""moa_core.graph_decode on the CPU, where its step runs eagerly (the reference path of the CUDA-graph replay, which
tests/test_device.py checks on a GPU): the same tokens as HF's greedy generate, for a plain model and for a
MixtureModel, and the buffers kept across calls."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import distinct_experts

from moa_core.graph_decode import GraphDecoder, weight_addresses


def left_padded(B: int, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts [B, T] whose rows have T, T - 1, ... real tokens (left padding: id 0, mask 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (B, T), generator=g)
    mask = torch.ones_like(ids)
    for i in range(B):
        mask[i, : i % 3] = 0
        ids[i, : i % 3] = 0
    return ids, mask


def test_plain_model_gives_hf_greedy_tokens(tiny_base):
    ids, mask = left_padded(4, 9, seed=1)
    ref = tiny_base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=7, min_new_tokens=7,
                             do_sample=False, pad_token_id=0)
    dec = GraphDecoder(tiny_base)
    assert torch.equal(dec.generate(ids, mask, 7, pad_token_id=0), ref)
    ids2, mask2 = left_padded(4, 6, seed=2)  # a shorter call reuses the cache and the buffers
    ref2 = tiny_base.generate(input_ids=ids2, attention_mask=mask2, max_new_tokens=5, min_new_tokens=5,
                              do_sample=False, pad_token_id=0)
    assert torch.equal(dec.generate(ids2, mask2, 5, pad_token_id=0), ref2)
    assert len(dec._decodes) == 1 and dec._kept[1] is dec.caches.last  # one entry: the kept cache's


def varied(model) -> None:
    """Wide random weights: the tiny model otherwise repeats one token, and eos tests need rows that differ."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(std=0.5)


def prompts_ending_at(model, T: int, columns: list[int]):
    """Left-padded prompts [len(columns), T] and eos ids such that row i first emits one at new-token column
    columns[i] in a greedy run (the first of 200 prompt draws that allows it) -> (ids, mask, eos)."""
    for seed in range(200):
        ids, mask = left_padded(len(columns), T, seed=seed)
        free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(columns) + 1,
                              min_new_tokens=max(columns) + 1, do_sample=False, pad_token_id=0)[:, T:]
        eos = [int(free[i, c]) for i, c in enumerate(columns)]
        if not any(int(t) in eos for i, c in enumerate(columns) for t in free[i, :c]):  # no row ends early
            return ids, mask, eos
    pytest.fail(f"no prompts among 200 whose rows first meet the eos ids at columns {columns}")


def test_rows_that_emit_eos_are_padded_and_the_call_stops_where_hf_does(tiny_base):
    """Rows ending at columns 1, 2 and 3: each gets padding after its eos, and the result is cut after column 3 as
    HF's generate cuts it (several eos ids; the check every step or every 8)."""
    varied(tiny_base)
    ids, mask, eos = prompts_ending_at(tiny_base, 8, [1, 2, 3])
    for check_every in (1, 8):
        dec = GraphDecoder(tiny_base, check_every=check_every)
        for new in (2, 12):
            ref = tiny_base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                     eos_token_id=eos, pad_token_id=1)
            out = dec.generate(ids, mask, new, eos_token_id=eos, pad_token_id=1)
            assert torch.equal(out, ref), (check_every, new)
    assert out.shape[1] == 8 + 4 and (out[0, 8 + 2:] == 1).all()  # cut after column 3; row 0 padded after column 1


@pytest.mark.parametrize("check_every, steps", [(1, 2), (8, 7)])
def test_every_row_finished_stops_the_steps(tiny_base, monkeypatch, check_every, steps):
    """A row whose third token is eos: the decoder stops stepping at its first check after that token (each check is
    a host sync, so the checks are `check_every` steps apart), not at max_new_tokens, and the result is cut there."""
    varied(tiny_base)
    for seed in range(4, 40):  # a prompt whose third new token is new
        ids, mask = left_padded(1, 6, seed=seed)
        free = tiny_base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3,
                                  do_sample=False, pad_token_id=0)
        eos = int(free[0, 6 + 2])
        if eos not in free[0, 6:8].tolist():
            break
    else:
        pytest.fail("no prompt among 36 whose third new token differs from the first two")
    dec = GraphDecoder(tiny_base, check_every=check_every)
    calls = []
    step = dec._step
    monkeypatch.setattr(dec, "_step", lambda buf, cache: (calls.append(1), step(buf, cache)))
    out = dec.generate(ids, mask, 50, eos_token_id=eos)
    assert torch.equal(out, free) and len(calls) == steps
    calls.clear()
    assert dec.generate(ids, mask, 50).shape[1] == 6 + 50 and len(calls) == 49  # no eos: every step runs


class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on the CPU: `replay` runs the recorded step (a real capture records the
    step without running it, which `_record` keeps: the step is not run at record time)."""

    def __init__(self, step):
        self.step, self.replays = step, 0

    def replay(self):
        self.replays += 1
        self.step()


@pytest.fixture
def fake_capture(monkeypatch):
    """GraphDecoder's capture path on the CPU: the warm-up and the state it saves and restores run as written; the
    side stream is none and the recorded graph is a FakeGraph."""
    import contextlib

    monkeypatch.setattr(GraphDecoder, "captures", lambda self, device, cache=None: True)
    monkeypatch.setattr(GraphDecoder, "_side_stream", staticmethod(contextlib.nullcontext))
    monkeypatch.setattr(GraphDecoder, "_record", staticmethod(FakeGraph))


@pytest.mark.parametrize("new", [2, 3, 9])
def test_the_capture_path_gives_hf_tokens_and_replays_one_graph(tiny_base, fake_capture, new):
    """Through the capture path (warm-up steps from the saved state, then replays): HF's tokens, also when the cache
    has exactly the slots the call needs (2 new tokens: the warm-up must write no slot past the call's own), and a
    second call with other prompts replays the same graph."""
    dec = GraphDecoder(tiny_base)
    for seed in (10, 11):
        ids, mask = left_padded(3, 7, seed=seed)
        ref = tiny_base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=0)
        assert torch.equal(dec.generate(ids, mask, new, pad_token_id=0), ref), seed
        graph = dec._kept[2].graph
        assert isinstance(graph, FakeGraph) and graph.replays == (new - 1) * (1 + (seed == 11))


def test_the_capture_path_of_a_mixture_replays_one_graph_for_every_mix_of_experts(tiny_cfg, tiny_base, fake_capture):
    mm = distinct_experts(tiny_cfg, tiny_base, std=0.3)
    gen = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    graphs = set()
    for seed, given in ((12, None), (13, None), (13, torch.tensor([1, 1, 0, 1])), (14, torch.tensor([0, 0, 0, 0]))):
        ids, mask = left_padded(4, 8, seed=seed)
        ref, _ = mm.generate(ids, mask, expert=given, **gen)
        out, _ = mm.generate_greedy(ids, mask, 5, pad_token_id=0, expert=given)
        assert torch.equal(out, ref), (seed, given)
        graphs.add(id(mm.graph_decoder._kept[2].graph))
    assert len(graphs) == 1


def test_eos_and_pad_default_to_the_generation_config(tiny_base):
    varied(tiny_base)
    ids, mask, tiny_base.generation_config.eos_token_id = prompts_ending_at(tiny_base, 8, [1, 3, 2])
    tiny_base.generation_config.pad_token_id = 2
    ref = tiny_base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    out = GraphDecoder(tiny_base).generate(ids, mask, 6)
    assert torch.equal(out, ref) and out.shape[1] == 8 + 4 and (out[0, 8 + 2:] == 2).all()


def test_the_capture_path_starts_each_row_unfinished_whatever_the_warm_up_emitted(tiny_base, fake_capture):
    """The warm-up runs the call's first step, whose eos marks rows done; the call's own steps must start from the
    state before it (a row whose first decode token is eos emits it, not padding)."""
    varied(tiny_base)
    ids, mask, eos = prompts_ending_at(tiny_base, 8, [1, 2])
    ref = tiny_base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                             eos_token_id=eos, pad_token_id=1)
    assert torch.equal(GraphDecoder(tiny_base).generate(ids, mask, 5, eos_token_id=eos, pad_token_id=1), ref)


def test_decode_returns_its_own_tensor(tiny_base):
    dec = GraphDecoder(tiny_base)
    ids, mask = left_padded(2, 6, seed=16)
    first = dec.generate(ids, mask, 4, pad_token_id=0)
    kept = first.clone()
    dec.generate(*left_padded(2, 6, seed=17), 4, pad_token_id=0)
    assert torch.equal(first, kept)


def test_capture_refuses_attention_and_caches_that_read_values_on_the_host(tiny_base, monkeypatch):
    dec = GraphDecoder(tiny_base)
    assert dec.captures(torch.device("cuda")) and not dec.captures(torch.device("cpu"))
    monkeypatch.setattr(tiny_base.config, "_attn_implementation", "flash_attention_2")
    with pytest.raises(ValueError, match="sdpa or eager"):
        dec.captures(torch.device("cuda"))


def test_bad_arguments_are_refused_before_any_step(tiny_base):
    ids, mask = left_padded(2, 5, seed=5)
    with pytest.raises(ValueError, match="check_every"):
        GraphDecoder(tiny_base, check_every=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        GraphDecoder(tiny_base).generate(ids, mask, 0)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            GraphDecoder(tiny_base, capture=True).generate(ids, mask, 3)


@pytest.mark.parametrize("fused", [False, True])
def test_mixture_greedy_equals_its_generate(tiny_cfg, tiny_base, fused):
    """MoA's routed generation through the decoder: the experts HF-generate routing picks and its tokens, with a
    mixed batch, then another mix of experts in the same buffers, and with the experts given."""
    mm = distinct_experts(tiny_cfg, tiny_base, std=0.3)
    mm.lora_fusion.enabled = fused  # True: the fused path's torch formulation (the CPU has no Triton kernels)
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    for seed in (6, 7):
        ids, mask = left_padded(5, 8, seed=seed)
        ref, ref_expert = mm.generate(ids, mask, **gen)
        out, expert = mm.generate_greedy(ids, mask, 6, pad_token_id=0)
        assert torch.equal(expert, ref_expert) and torch.equal(out, ref), seed
        if seed == 6:
            kept = mm.graph_decoder._kept[2]
    assert mm.graph_decoder._kept[2] is kept  # the second mix of experts reused the first call's buffers
    given = torch.tensor([1, 0, 1, 1, 0])
    ref, _ = mm.generate(ids, mask, expert=given, **gen)
    out, expert = mm.generate_greedy(ids, mask, 6, pad_token_id=0, expert=given)
    assert expert is given and torch.equal(out, ref)


def test_mixture_weights_moved_elsewhere_get_new_buffers(tiny_cfg, tiny_base):
    """A captured step reads its weights' addresses: new weights in place keep the buffers (and a capture), weights
    replaced by new tensors get new buffers in place of the old ones, and both give the tokens of HF's generate."""
    mm = distinct_experts(tiny_cfg, tiny_base, std=0.3)
    ids, mask = left_padded(3, 7, seed=8)
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    mm.generate_greedy(ids, mask, 4, pad_token_id=0)

    def buffers():
        return mm.graph_decoder._kept[2]

    first = buffers()
    w = next(iter(mm.wrapped.values()))
    with torch.no_grad():
        w.lora_B.mul_(-1.0)  # in place
    assert torch.equal(mm.generate_greedy(ids, mask, 4, pad_token_id=0)[0], mm.generate(ids, mask, **gen)[0])
    assert buffers() is first
    w.lora_B = torch.nn.Parameter(w.lora_B.detach() * 2.0, requires_grad=False)  # a new tensor
    assert torch.equal(mm.generate_greedy(ids, mask, 4, pad_token_id=0)[0], mm.generate(ids, mask, **gen)[0])
    assert buffers() is not first


def test_weight_addresses_change_when_a_tensor_moves_and_not_when_it_changes_in_place(tiny_cfg, tiny_base):
    """The weights' part of a captured step's key (`weight_addresses`): the same while weights change in place; a new
    one when any parameter, buffer or `extra` tensor is replaced, moved (`p.data = ...`) or reshaped, or a submodule
    swapped; none left out (each tensor of a mixture, moved in turn, changes it); a module cycle is walked once."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self, shared: nn.Module) -> None:
            super().__init__()
            self.shared = shared  # one submodule under two parents
            self.proj = nn.Linear(4, 4, bias=False)  # a None slot in _parameters
            self.register_buffer("scale", torch.ones(4))
            self.register_buffer("absent", None)
            self.add_module("gone", None)

    shared = nn.Linear(4, 4)
    model = nn.Sequential(Block(shared), nn.Sequential(Block(shared)), nn.Linear(4, 4, bias=False))
    model[2].weight = model[0].proj.weight  # tied
    extra = [torch.zeros(3)]

    def key():
        return weight_addresses(model, extra)

    before = key()
    assert key() == before
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers(), *extra]:
            t.add_(1)
    assert key() == before

    def reshaped(t):  # the same storage and address, another shape
        view = t.data.view(2, 8)
        assert view.data_ptr() == t.data_ptr()
        return view

    moves = {
        "a replaced parameter": lambda: setattr(model[1][0].proj, "weight", nn.Parameter(torch.ones(4, 4))),
        "a replaced buffer": lambda: setattr(model[1][0], "scale", torch.ones(4)),
        "a swapped submodule": lambda: model[1].__setitem__(0, Block(shared)),
        "a parameter moved by p.data": lambda: setattr(shared.bias, "data", shared.bias.data.clone()),
        "a buffer moved by b.data": lambda: setattr(model[0].scale, "data", model[0].scale.data.clone()),
        "a tied parameter moved": lambda: setattr(model[2].weight, "data", model[2].weight.data.clone()),
        "a reshaped parameter": lambda: setattr(shared.weight, "data", reshaped(shared.weight)),
        "a replaced extra tensor": lambda: extra.__setitem__(0, torch.zeros(3)),
    }
    for what, move in moves.items():
        old = key()
        move()
        assert key() != old, f"{what} left the key as it was"

    mm = distinct_experts(tiny_cfg, tiny_base)
    tensors = [*mm.named_parameters(remove_duplicate=False), *mm.named_buffers(remove_duplicate=False)]
    assert len(tensors) > 20
    for name, t in tensors:
        old = weight_addresses(mm)
        t.data = t.data.clone()
        assert weight_addresses(mm) != old, f"{name} is not in the key"

    loop = nn.Module()
    loop.inner = nn.Linear(2, 2)
    loop.inner.outer = loop
    assert weight_addresses(loop) == weight_addresses(loop)


def test_token_routed_mixture_greedy_equals_its_generate(tiny_cfg, tiny_base):
    """MoSLD (token top-2 routing): the routers run inside each step."""
    from moa_core.methods import build_mixture

    torch.manual_seed(0)
    mm = build_mixture(tiny_cfg, "mosld", tiny_base, "tiny")
    with torch.no_grad():
        for w in mm.wrapped.values():
            w.lora_B.normal_(std=0.3)
    ids, mask = left_padded(3, 8, seed=9)
    gen = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    ref, _ = mm.generate(ids, mask, **gen)
    out, expert = mm.generate_greedy(ids, mask, 5, pad_token_id=0)
    assert expert is None and torch.equal(out, ref)
    given = torch.tensor([1, 0, 1])  # an expert given: that expert in every layer, in the prompt and the steps
    ref, _ = mm.generate(ids, mask, expert=given, **gen)
    assert not torch.equal(ref, out)
    assert torch.equal(mm.generate_greedy(ids, mask, 5, pad_token_id=0, expert=given)[0], ref)


def test_greedy_refusal_names_what_hf_would_do_beyond_argmax(tiny_base):
    from moa_core.generation import greedy_refusal

    plain = dict(max_new_tokens=4, do_sample=False, eos_token_id=2, pad_token_id=0)
    assert greedy_refusal(tiny_base, plain) is None
    assert "min_new_tokens" in greedy_refusal(tiny_base, {**plain, "min_new_tokens": 4})  # masks eos: other tokens
    assert "output_scores" in greedy_refusal(tiny_base, {**plain, "output_scores": True})
    assert "do_sample" in greedy_refusal(tiny_base, {**plain, "do_sample": True})
    assert "max_new_tokens" in greedy_refusal(tiny_base, {"do_sample": False})
    tiny_base.generation_config.repetition_penalty = 1.3  # the model's own config counts where the call is silent
    assert "repetition_penalty" in greedy_refusal(tiny_base, plain)
    assert greedy_refusal(tiny_base, {**plain, "repetition_penalty": 1.0}) is None


@pytest.mark.parametrize("method", ["moa", "mosld", "modula-flan", "modula-res"])
def test_plain_greedy_generate_runs_through_the_decoder_where_it_captures(tiny_cfg, tiny_base, fake_capture,
                                                                          monkeypatch, method):
    """`MixtureModel.generate` of every method: a plain greedy call on a device where the decoder captures (the CPU
    made to look like one) replays the decoder's graph and returns HF's tokens and experts; calls the decoder
    cannot take (min_new_tokens, the adapters off) and graph_decoding=False stay on HF's generate."""
    from moa_core.methods import build_mixture

    monkeypatch.setattr(GraphDecoder, "refusal", lambda self, device, cache=None: None)
    torch.manual_seed(0)
    mm = build_mixture(tiny_cfg, method, tiny_base, "tiny")
    with torch.no_grad():
        for w in mm.wrapped.values():
            w.lora_B.normal_(std=0.3)
    ids, mask = left_padded(4, 8, seed=20)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)  # eos: the config's
    mm.graph_decoding = False
    ref, ref_expert = mm.generate(ids, mask, **gen)
    assert mm.graph_decoder is None
    mm.graph_decoding = True
    out, expert = mm.generate(ids, mask, **gen)
    graph = mm.graph_decoder._kept[2].graph
    assert isinstance(graph, FakeGraph) and graph.replays > 0, "the call did not go through the decoder"
    assert torch.equal(out, ref) and (expert is None) == (ref_expert is None)
    assert expert is None or torch.equal(expert, ref_expert)
    replays = graph.replays
    mm.generate(ids, mask, min_new_tokens=6, **gen)
    mm.generate(ids, mask, adapters_off=True, **gen)
    assert graph.replays == replays, "a call the decoder cannot take went through it"


def test_greedy_refusal_takes_neutral_and_sampling_only_settings_and_refuses_explicit_nones(tiny_base):
    from moa_core.generation import greedy_refusal

    plain = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    harmless = dict(temperature=0.7, top_p=0.9, use_cache=True, return_dict_in_generate=False,
                    cache_implementation="static")  # HF's greedy tokens and return type are the same with these
    assert greedy_refusal(tiny_base, {**plain, **harmless}) is None
    assert "eos_token_id=None" in greedy_refusal(tiny_base, {**plain, "eos_token_id": None})  # HF: no eos at all
    assert "pad_token_id=None" in greedy_refusal(tiny_base, {"max_new_tokens": 4, "pad_token_id": None})
    assert "cache_implementation" in greedy_refusal(tiny_base, {**plain, "cache_implementation": "quantized"})
    tiny_base.generation_config.return_dict_in_generate = True  # HF would return an output object, not a tensor
    assert "return_dict_in_generate" in greedy_refusal(tiny_base, plain)


def test_eos_ids_take_ints_lists_tensors_and_numpy(tiny_base):
    import numpy as np

    from moa_core.graph_decode import eos_ids

    assert eos_ids(tiny_base, 5) == [5] and eos_ids(tiny_base, [5, 7]) == [5, 7]
    assert eos_ids(tiny_base, torch.tensor([5, 7])) == [5, 7] and eos_ids(tiny_base, np.int64(5)) == [5]


def test_autocast_calls_stay_on_hf_generate_and_the_decoder_refuses_them(tiny_cfg, tiny_base, monkeypatch):
    """Evaluation runs generate under bf16 autocast (train.precision bf16): a static cache takes one dtype and
    autocast's keys and values come in two, so those calls keep HF's loop; the decoder itself refuses them."""
    monkeypatch.setattr(GraphDecoder, "refusal", lambda self, device, cache=None: None)
    mm = distinct_experts(tiny_cfg, tiny_base, std=0.3)
    ids, mask = left_padded(3, 7, seed=21)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = mm.generate(ids, mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert out.shape == (3, 7 + 4) and mm.graph_decoder is None, "an autocast call went to the decoder"
        with pytest.raises(ValueError, match="autocast"):
            mm.generate_greedy(ids, mask, 4, pad_token_id=0)


def test_models_with_sliding_window_layers_are_refused_before_any_cache_exists(tiny_base):
    """A Mistral-like config (every layer a sliding window): generate keeps HF's loop for it instead of failing in
    the decode after the routing pass; a plain Llama's layers are full and capture."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=64, vocab_size=64, sliding_window=16)
    cuda = torch.device("cuda")  # refusal reads only the device's type and the config: no GPU needed
    assert "sliding-window" in GraphDecoder(MistralForCausalLM(cfg)).refusal(cuda)
    assert GraphDecoder(tiny_base).refusal(cuda) is None
    assert not GraphDecoder(tiny_base, capture=0).captures(cuda)  # a falsy capture means "do not capture"


def test_captured_prompts_give_hf_tokens_and_keep_the_last_shapes(tiny_base, fake_capture):
    """A plain model with its prompt pass captured per shape (the 4D mask path, through the fake capture): HF's tokens
    for left-padded prompts, one graph per prompt shape replayed while the shape repeats, and at most
    `prompt_shapes` kept, the least recently used dropped."""
    dec = GraphDecoder(tiny_base, prompt_shapes=2)
    graphs = {}
    for T, seed in ((7, 20), (7, 21), (5, 22), (7, 23), (6, 24), (5, 25)):
        ids, mask = left_padded(3, T, seed=seed)
        ref = tiny_base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4,
                                 do_sample=False, pad_token_id=0)
        assert torch.equal(dec.generate(ids, mask, 4, pad_token_id=0), ref), (T, seed)
        graphs.setdefault(T, []).append(next(reversed(dec._prompts.values())).graph)
    assert graphs[7][0] is graphs[7][1] is graphs[7][2]  # 7, 7, 5, 7: the shape of 7 kept throughout
    assert graphs[5][0] is not graphs[5][1]  # 6 came in after 7 was used again: 5 was dropped, and captured anew
    assert len(dec._prompts) == 2 and graphs[7][0].replays == 3


def test_a_captured_prompt_starts_from_an_empty_cache_each_call(tiny_base, fake_capture):
    """The warm-up passes and the capture write the cache; the call's own pass must find it empty (else the prompt
    is written after the warm-up's copy and the decode steps read the wrong slots)."""
    dec = GraphDecoder(tiny_base, prompt_shapes=1)
    ids, mask = left_padded(2, 6, seed=26)
    dec.generate(ids, mask, 3, pad_token_id=0)
    cache = dec.caches.last
    assert int(cache.get_seq_length()) == 6 + 3 - 1  # the prompt and the two tokens fed back, not the warm-ups'


def test_prompt_attention_is_causal_over_real_tokens_only():
    from moa_core.graph_decode import prompt_attention

    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    allowed = prompt_attention(mask, cache_len=5, dtype=torch.float32)[:, 0] == 0  # [B, T, L]
    assert allowed.shape == (2, 3, 5)
    assert allowed[1].tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]
    assert allowed[0].tolist() == [[0, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 1, 1, 0, 0]]  # the padding key never


@pytest.mark.parametrize("inference", ["last", "vote"])
def test_a_mixture_with_captured_prompts_routes_and_generates_as_its_generate(tiny_cfg, tiny_base, fake_capture,
                                                                             inference):
    """MoA's routing pass captured per prompt shape, written straight into the static cache: HF-generate's experts
    and tokens for several mixes of experts through one prompt graph, also when rows are routed again because
    their layers disagreed (vote: whatever the layers chose)."""
    mm = distinct_experts(tiny_cfg, tiny_base, std=0.3)
    mm.spec.inference = inference
    mm.graph_decoder = GraphDecoder(mm.model, prompt_shapes=2)
    gen = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    disagreed = 0
    for seed in (30, 31, 32, 33):
        ids, mask = left_padded(6, 8, seed=seed)
        ref, ref_expert = mm.generate(ids, mask, **gen)
        out, expert = mm.generate_greedy(ids, mask, 5, pad_token_id=0)
        assert torch.equal(expert, ref_expert) and torch.equal(out, ref), seed
        _, logits = mm.route(ids, mask)
        disagreed += int((logits.argmax(-1) != expert).any(0).sum())
    (graph,) = {id(g.graph) for g in mm.graph_decoder._prompts.values()}
    assert next(iter(mm.graph_decoder._prompts.values())).graph.replays == 4
    assert disagreed > 0, "no row was routed again: the test does not reach the redo"


def test_prompt_graphs_of_a_cache_no_longer_used_are_dropped(tiny_base, fake_capture):
    """A longer call replaces the kept static cache (StaticCaches never goes back to a shorter one): the prompt
    graphs of the old cache can never replay again, and each holds that cache's memory, so they go at once."""
    dec = GraphDecoder(tiny_base, prompt_shapes=4)
    for T, new in ((6, 4), (7, 4), (6, 30), (7, 29)):  # the last two need the same 35 positions
        ids, mask = left_padded(2, T, seed=T + new)
        dec.generate(ids, mask, new, pad_token_id=0)
    live = dec.caches.last
    assert len(dec._prompts) == 2 and all(g.cache is live for g in dec._prompts.values())


def test_a_mixture_captures_its_routing_pass_anew_when_the_way_it_picks_changes(tiny_cfg, tiny_base, fake_capture):
    """`inference` (last layer or vote) and `pooling` are Python branches of the captured routing pass: a graph
    captured under one must not be replayed under the other."""
    mm = distinct_experts(tiny_cfg, tiny_base, std=0.3)
    mm.graph_decoder = GraphDecoder(mm.model, prompt_shapes=4)
    ids, mask = left_padded(4, 8, seed=40)
    graphs = []
    for inference in ("last", "vote", "last"):
        mm.spec.inference = inference
        mm.generate_greedy(ids, mask, 3, pad_token_id=0)
        graphs.append(next(reversed(mm.graph_decoder._prompts.values())).graph)
    assert graphs[0] is not graphs[1] and graphs[2] is graphs[0]


@pytest.mark.parametrize("method", ["moa", "mosld"])
def test_a_batch_of_one_expert_decodes_with_it_folded_into_the_weights(tiny_cfg, tiny_base, fake_capture, method):
    """`fold_single_expert`: a batch whose rows all use one expert (batch 1; an expert given for all) decodes with
    that expert's LoRA folded into the weights, giving generate's tokens (fp32); a mixed batch decodes routed. The
    two steps are two graphs kept side by side; another expert, or weights changed in place, refold into the same
    weights and replay the same graph. A mixture that cannot fold (MoSLD's shared A) decodes routed throughout."""
    from moa_core.methods import build_mixture

    torch.manual_seed(0)
    mm = build_mixture(tiny_cfg, method, tiny_base, "tiny")
    with torch.no_grad():
        for w in mm.wrapped.values():
            w.lora_B.normal_(std=0.3)
    mm.lora_fusion.enabled = True  # the fused path's torch formulation (the CPU has no Triton kernels)
    mm.fold_single_expert = True
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    ids, mask = left_padded(4, 8, seed=50)
    ones, zeros = torch.tensor([1, 1, 1, 1]), torch.tensor([0, 0, 0, 0])
    calls = [(ids[:1], mask[:1], None), (ids, mask, ones), (ids, mask, None), (ids, mask, ones), (ids, mask, zeros),
             (ids[2:3], mask[2:3], None)]
    steps = []
    for i, (x, m, given) in enumerate(calls):
        if i == 3:
            with torch.no_grad():
                next(iter(mm.wrapped.values())).lora_B.mul_(-1.0)  # in place: the fold must not go stale
        ref, ref_expert = mm.generate(x, m, expert=given, **gen)
        out, expert = mm.generate_greedy(x, m, 6, pad_token_id=0, expert=given)
        assert torch.equal(out, ref) and (expert is ref_expert or torch.equal(expert, ref_expert)), i  # MoSLD: None
        key, _, buf = mm.graph_decoder._kept
        steps.append(("folded" in key[4], buf.graph, len(mm.graph_decoder._decodes)))  # key[4]: the caller's key
        assert buf.graph.replays > 0
    if method == "mosld":
        assert not any(folded for folded, _, _ in steps)
        return
    assert [folded for folded, _, _ in steps] == [True, True, False, True, True, True]
    assert steps[1][1] is steps[3][1] is steps[4][1], "the folded step of batch 4 was captured again"
    assert steps[5][1] is steps[0][1], "batch 1's folded step was captured again after the calls of batch 4"
    assert [kept for _, _, kept in steps] == [1, 2, 3, 3, 3, 3]  # batch 1's, batch 4's folded, batch 4's routed
    assert mm.lora_fusion.groups[0].folded_expert == int(expert[0])


@pytest.mark.parametrize("failing", ["decode step", "prompt pass"])
def test_a_failed_capture_falls_back_to_hf_generate_with_one_warning(tiny_cfg, tiny_base, fake_capture,
                                                                     monkeypatch, failing):
    """A capture that fails (here: recording raises, as an op that syncs with the host does under a real capture) is a
    CaptureError from the decoder; MixtureModel.generate then answers the same call through HF's generate, says so
    once, and stops trying. Nothing half-captured is kept."""
    from moa_core.graph_decode import CaptureError

    monkeypatch.setattr(GraphDecoder, "refusal", lambda self, device, cache=None: None)
    mm = distinct_experts(tiny_cfg, tiny_base, std=0.3)
    mm.graph_decoder = GraphDecoder(mm.model, prompt_shapes=1)
    ids, mask = left_padded(3, 8, seed=60)
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    mm.graph_decoding = False
    ref, ref_expert = mm.generate(ids, mask, **gen)
    mm.graph_decoding = True

    def record(step):  # GraphDecoder._capture_prompt records its local `record`, _capture a lambda
        if (step.__name__ == "record") == (failing == "prompt pass"):
            raise RuntimeError("operation not permitted when stream is capturing")
        return FakeGraph(step)

    monkeypatch.setattr(GraphDecoder, "_record", staticmethod(record))
    with pytest.raises(CaptureError, match=f"capturing the {failing}"):
        mm.generate_greedy(ids, mask, 5, pad_token_id=0)
    kept_prompts = [g.graph for g in mm.graph_decoder._prompts.values()]  # the captured one only
    assert not mm.graph_decoder._decodes and None not in kept_prompts
    assert len(kept_prompts) == (failing == "decode step")
    with pytest.warns(UserWarning, match="HF's generate from now on") as caught:
        out, expert = mm.generate(ids, mask, **gen)
    assert len(caught) == 1 and torch.equal(out, ref) and torch.equal(expert, ref_expert)
    assert mm.graph_decoding is False and mm.graph_decoder.caches.last is None  # its caches freed, not left behind
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second attempt, no second warning
        assert torch.equal(mm.generate(ids, mask, **gen)[0], ref)


@pytest.mark.parametrize("cache_kinds", [1, 2])
def test_alternating_batch_sizes_replay_their_own_graphs_while_their_caches_are_kept(tiny_base, fake_capture,
                                                                                     cache_kinds):
    """Batches of 2 and 3 rows in turn: with two cache kinds kept, each batch size keeps its cache and its captured
    step (HF's tokens every call, one capture each); with one, each call replaces the other's cache, and the graphs of
    the dropped cache go with it."""
    dec = GraphDecoder(tiny_base, prompt_shapes=2, cache_kinds=cache_kinds)
    graphs, caches = [], []
    for B in (2, 3, 2, 3):
        ids, mask = left_padded(B, 6, seed=70 + B)
        ref = tiny_base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4,
                                 do_sample=False, pad_token_id=0)
        assert torch.equal(dec.generate(ids, mask, 4, pad_token_id=0), ref), B
        graphs.append(dec._kept[2].graph)
        caches.append(dec.caches.last)
        live = [c for c in caches if dec.caches.holds(c)]
        assert all(any(d.cache is k for k in live) for d in dec._decodes.values()), "a graph outlived its cache"
        assert all(any(g.cache is k for k in live) for g in dec._prompts.values()), "a prompt graph outlived its cache"
    assert (graphs[2] is graphs[0] and graphs[3] is graphs[1]) == (cache_kinds == 2)
    assert (caches[2] is caches[0]) == (cache_kinds == 2)
    assert len(dec._decodes) == cache_kinds and len(dec._prompts) == cache_kinds


def test_static_caches_keep_the_last_kinds_and_grow_only(tiny_base):
    from moa_core.graph_decode import StaticCaches

    caches = StaticCaches(size=2)
    kind = {B: (B, torch.float32, torch.device("cpu")) for B in (1, 2, 3)}
    a = caches.get(tiny_base, kind[1], 10)
    b = caches.get(tiny_base, kind[2], 8)
    assert b.layers[0].max_cache_len == 10  # never shorter than the model's last
    assert caches.get(tiny_base, kind[1], 9) is a and caches.last is a
    c = caches.get(tiny_base, kind[3], 10)  # a third kind: the least recently used (batch 2's) goes
    assert not caches.holds(b) and caches.holds(a) and caches.holds(c)
    longer = caches.get(tiny_base, kind[1], 12)  # too short: replaced
    assert longer is not a and not caches.holds(a) and longer.layers[0].max_cache_len == 12
    with pytest.raises(ValueError, match="at least 1"):
        StaticCaches(size=0)


@pytest.mark.parametrize("error", [ValueError("a bug of the step"), torch.OutOfMemoryError("CUDA out of memory")])
def test_errors_that_are_not_the_capture_s_propagate_and_keep_graph_decoding_on(tiny_cfg, tiny_base, fake_capture,
                                                                                monkeypatch, error):
    """An error in the warm-up's eager run of the step (not torch.compile's) is the step's own, and running out of
    memory is not a capture failure either: both reach the caller as they are, with graph decoding still on (no
    silent, lasting fallback)."""
    monkeypatch.setattr(GraphDecoder, "refusal", lambda self, device, cache=None: None)
    mm = distinct_experts(tiny_cfg, tiny_base, std=0.3)
    ids, mask = left_padded(3, 8, seed=61)

    def step(self, buf, cache):
        raise error

    def record(step_fn):
        raise error

    monkeypatch.setattr(GraphDecoder, "_step" if isinstance(error, ValueError) else "_record",
                        step if isinstance(error, ValueError) else staticmethod(record))
    with pytest.raises(type(error), match=str(error)):
        mm.generate(ids, mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert mm.graph_decoding is True


def test_what_counts_as_a_capture_failure():
    """Recording: any error but running out of memory. Warm-up (an eager run of the step): torch.compile's own
    failures only, not the step's errors that dynamo re-raises (TorchRuntimeError), nor a compile failure that wraps
    running out of memory."""
    from torch._dynamo.exc import BackendCompilerFailed, TorchRuntimeError

    from moa_core.graph_decode import CaptureError, _capturing

    def raised(exc, recording):
        try:
            with _capturing("decode step", recording=recording):
                raise exc
        except Exception as out:  # noqa: BLE001 - the test looks at which one comes out
            return type(out)

    oom = torch.OutOfMemoryError("CUDA out of memory")
    assert raised(RuntimeError("operation not permitted when stream is capturing"), True) is CaptureError
    assert raised(oom, True) is torch.OutOfMemoryError
    assert raised(ValueError("a bug of the step"), False) is ValueError
    assert raised(TorchRuntimeError("a shape error in the traced step"), False) is TorchRuntimeError
    assert raised(BackendCompilerFailed(print, RuntimeError("inductor failed"), None), False) is CaptureError
    assert raised(BackendCompilerFailed(print, oom, None), False) is BackendCompilerFailed


def test_a_cache_the_caller_brings_gets_its_own_graph_and_dropped_caches_free_their_graphs(tiny_base, fake_capture):
    """Graphs are kept per cache: a call over the caller's own cache, of the same shape as one the decoder holds,
    captures anew and writes the caller's cache (not the held one's graph replayed); and a cache the decoder drops
    takes its graphs with it at once, before the new cache is filled (else both would be in memory)."""
    import gc
    import weakref

    from transformers import StaticCache

    from moa_core.graph_decode import prefill

    dec = GraphDecoder(tiny_base, cache_kinds=1)
    ids, mask = left_padded(2, 6, seed=80)
    ref = tiny_base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4,
                             do_sample=False, pad_token_id=0)
    assert torch.equal(dec.generate(ids, mask, 4, pad_token_id=0), ref)
    held = dec.caches.last
    mine = StaticCache(config=tiny_base.config, max_cache_len=held.layers[0].max_cache_len)
    first = prefill(tiny_base, ids, mask, mine)
    new = dec.decode(mine, mask, first, 4, pad_token_id=0, key=weight_addresses(tiny_base))
    assert torch.equal(new, ref[:, 6:]) and int(mine.get_seq_length()) == 6 + 3
    assert len(dec._decodes) == 2 and dec._kept[1] is mine

    gone = weakref.ref(held)
    del held
    get = dec.caches.get

    def get_and_check(*args):  # batch 3: a new kind replaces batch 2's cache (cache_kinds=1)
        cache = get(*args)
        gc.collect()  # a fake graph and its buffers form a cycle
        assert gone() is None, "the dropped cache lived on while its replacement was handed out"
        return cache

    dec.caches.get = get_and_check
    ids3, mask3 = left_padded(3, 6, seed=81)
    dec.generate(ids3, mask3, 4, pad_token_id=0)
