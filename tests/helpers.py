"""Test data and settings shared by conftest and the scripts that run without pytest (tests/test_device.py,
tests/ddp_worker.py on the GPU machine, whose image has torch, transformers, peft and pyyaml only)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def tiny_raw_params(model_dir: Path, domains: list[dict] | None = None) -> dict:
    """params.yaml contents for tests: the project's params with the tiny model and the quick profile."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["base_model"]["source"] = str(model_dir)
    if domains is not None:
        raw["domains"] = domains
    return raw


def toy_records(n_domains: int = 3, n: int = 12) -> list[list[dict]]:
    words = ["alpha", "beta", "gamma", "delta"]
    return [[{"instruction": f"{words[k]} question {i}", "response": f"{words[k]} answer " * (1 + i % 3)}
             for i in range(n)] for k in range(n_domains)]


def curate_in_process(params: Path, domain: str) -> None:
    """What `moa stage curate <domain>` writes, in this process: set-up for tests whose subject is a later stage
    run as its own process (saves a process start, ~8 s of imports on a 2-core runner)."""
    from tasks.common import StageContext
    from tasks.curate import run_curate

    run_curate(StageContext.load(params), domain)


def distinct_experts(cfg, base, std: float = 0.2):
    """An MoA mixture (seed 0) whose experts change the output (random B, std `std`) and whose untrained routers
    disagree across layers."""
    import torch

    from moa_core.methods import build_mixture

    torch.manual_seed(0)
    mm = build_mixture(cfg, "moa", base, "tiny")
    with torch.no_grad():
        for w in mm.wrapped.values():
            w.lora_B.normal_(std=std)
    return mm
