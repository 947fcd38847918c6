"""`moa export`: each MoA expert as a PEFT adapter folder PEFT itself loads, and the router on its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from moa_core.batching import collate, encode_prompt
from moa_core.export import ExportError, export_mixture
from moa_core.fallback import routing_confidence
from moa_core.model import save_mixture
from moa_core.standalone_router import StandaloneRouter
from moa_core.methods import build_mixture

PROMPTS = ["What is fever?", "def add(a, b):", "Shares fell as the bank cut its forecast.", "Arsenal won 2-0.",
           "A quiet afternoon in the garden."]


def trained_like_moa(cfg, base, seed: int = 0, b_std: float = 0.05):
    """A MoA mixture whose experts and routers all differ (as after training): random non-zero B (b_std = 1:
    strong enough to change the tiny model's greedy text), and one expert with its own scaling."""
    mm = build_mixture(cfg, "moa", base, "tiny")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in mm.wrapped.values():
            w.lora_B.copy_(torch.randn(w.lora_B.shape, generator=g) * b_std)
            w.scaling[1] = 0.5  # an expert trained with another alpha
        for r in mm.routers:
            r.weight.copy_(torch.randn(r.weight.shape, generator=g))
    return mm


def spread_routers(mm, tok, prompts):
    """Random routers send every prompt to one expert: the pooled prompt states share a large common part
    (the chat template). Remove that part from each router's rows, so the prompts' own parts decide."""
    from moa_core.model import decoder_layers
    from moa_core.routing import _rms, pool

    b = _batch(tok, prompts)
    seen = {}
    hooks = [layer.register_forward_pre_hook(lambda _m, args, kw, i=i: seen.__setitem__(i, args[0] if args else kw["hidden_states"]),
                                             with_kwargs=True) for i, layer in enumerate(decoder_layers(mm.model))]
    with torch.no_grad():
        mm(b["input_ids"], b["attention_mask"], adapters_off=True)
        for h in hooks:
            h.remove()
        for i, r in enumerate(mm.routers):
            common = _rms(pool(seen[i], b["attention_mask"])).mean(0)
            common = common / common.norm()
            r.weight.sub_(torch.outer(r.weight @ common, common))
            logits = r(pool(seen[i], b["attention_mask"]))  # [B, E]: scaled to a spread of 0.5, so that
            r.weight.mul_(0.5 / logits.std())  # decisions differ between prompts and stay unsure (confidence < 1)


def _batch(tok, prompts):
    return collate([{"input_ids": encode_prompt(tok, p, 64)} for p in prompts], tok.pad_token_id, left_pad=True)


@pytest.fixture
def exported(tmp_path: Path, tiny_cfg, tiny_base, tiny_model_dir, tiny_tok):
    mm = trained_like_moa(tiny_cfg, tiny_base)
    spread_routers(mm, tiny_tok, PROMPTS)
    save_mixture(mm, tmp_path / "mix")
    meta = export_mixture(tmp_path / "mix", tmp_path / "export", base_model_path=str(tiny_model_dir),
                          fallback_threshold=None)
    return mm, tmp_path / "export", meta


def test_each_exported_adapter_loads_in_peft_and_equals_the_forced_expert(exported, tiny_model_dir, tiny_tok):
    mm, out, meta = exported
    b = _batch(tiny_tok, PROMPTS)
    configs = []
    for k, name in enumerate(mm.spec.experts):
        folder = out / meta["adapters"][name]
        configs.append(json.loads((folder / "adapter_config.json").read_text()))
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder).eval()
        forced = torch.full((len(PROMPTS),), k)
        with torch.no_grad():
            ours = mm(b["input_ids"], b["attention_mask"], expert=forced).logits
            theirs = peft_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            base = mm(b["input_ids"], b["attention_mask"], adapters_off=True).logits
        assert not torch.allclose(ours, base, atol=1e-3), "the expert changes nothing: the test could not fail"
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    # uniform rank and target modules (what a multi-LoRA server needs); alpha carries each expert's scaling
    assert {c["r"] for c in configs} == {mm.spec.r}
    assert {tuple(sorted(c["target_modules"])) for c in configs} == {tuple(sorted(mm.spec.target_modules))}
    assert configs[1]["lora_alpha"] == pytest.approx(0.5 * mm.spec.r)
    assert configs[0]["lora_alpha"] == pytest.approx(tiny_cfg_scaling(mm) * mm.spec.r)


def tiny_cfg_scaling(mm) -> float:
    return float(next(iter(mm.wrapped.values())).scaling[0])


def test_standalone_router_matches_the_mixture(exported, tiny_model_dir, tiny_tok):
    mm, out, _ = exported
    b = _batch(tiny_tok, PROMPTS)
    expert, logits = mm.route(b["input_ids"], b["attention_mask"])
    conf = routing_confidence(logits, expert, mm.spec.inference)
    assert len(set(expert.tolist())) > 1, "all prompts go to one expert: the comparison would be weak"
    router = StandaloneRouter.load(out, max_length=64)  # the base model path recorded at export
    got = router.route(PROMPTS)
    assert [d.expert for d in got] == [mm.spec.experts[i] for i in expert.tolist()]
    assert [d.confidence for d in got] == pytest.approx(conf.tolist(), abs=1e-5)
    assert all(0 < d.confidence <= 1 for d in got)
    # a threshold above every confidence sends every prompt to the base model
    always = StandaloneRouter(router.mm, router.tok, threshold=1.01, max_length=64)
    assert {d.expert for d in always.route(PROMPTS)} == {"base"}


def test_token_level_methods_are_refused_with_the_reason(tmp_path, tiny_cfg, tiny_base):
    save_mixture(build_mixture(tiny_cfg, "mosld", tiny_base, "tiny"), tmp_path / "mix")
    with pytest.raises(ExportError, match="per token.*method: moa"):
        export_mixture(tmp_path / "mix", tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_moa_export_command(tmp_path: Path, tiny_model_dir, tiny_cfg, tiny_base, tiny_tok):
    import yaml
    from typer.testing import CliRunner

    from conftest import tiny_raw_params
    from moa_cli.main import app

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_raw_params(tiny_model_dir), sort_keys=False))
    mm = trained_like_moa(tiny_cfg, tiny_base)
    mm.spec.fallback_threshold = 0.4
    save_mixture(mm, tmp_path / "models/mixture/moa")
    r = CliRunner().invoke(app, ["export", "-p", str(tmp_path / "params.yaml")])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["out"] == str(tmp_path / "models/export/moa") and out["fallback_threshold"] == 0.4
    for name in ["code", "medicine", "finance", "sports"]:
        assert (tmp_path / "models/export/moa/adapters" / name / "adapter_model.safetensors").exists()
    assert StandaloneRouter.load(tmp_path / "models/export/moa").threshold == 0.4  # base model path recorded

    r = CliRunner().invoke(app, ["export", "--method", "mosld", "-p", str(tmp_path / "params.yaml")])
    assert r.exit_code == 2 and "no saved mixture" in r.output and "train_router" in r.output, r.output
