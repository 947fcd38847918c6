"""One training job for tests/test_distributed.py, run under torchrun (1 process = no DDP, N = DDP).

usage: python -m torch.distributed.run --standalone --nproc-per-node N tests/ddp_worker.py \
           MODEL_DIR OUT_DIR
Trains a PEFT LoRA and a MoA mixture (stage 2, gold routing + routing loss) on two toy domains; rank 0
writes OUT_DIR/<recipe>/history.json and OUT_DIR/<recipe>/params.safetensors (the trained tensors)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(model_dir: Path, out_root: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers import tiny_raw_params, toy_records
    from moa_core.config import parse_config
    from moa_core.distributed import init_from_env, shutdown
    from moa_core.methods import build_mixture
    from moa_core.train import train_mixture, train_peft_lora

    dp = init_from_env()
    torch.set_num_threads(1)
    cfg = parse_config(tiny_raw_params(model_dir), profile="quick")
    # no LoRA dropout: its masks depend on which process draws them, which would hide what is compared. A clip low
    # enough to act at every step: each rank must clip as one process would (MoA's per expert, from the whole batch)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": 4, "log_every": 1,
                                                                        "grad_clip": 1e-3}),
                                 "lora": cfg.lora.model_copy(update={"dropout": 0.0})})
    tok = AutoTokenizer.from_pretrained(model_dir)
    records = toy_records(n_domains=2, n=8)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for recipe in ("peft", "moa"):
        base = AutoModelForCausalLM.from_pretrained(model_dir).to(dp.device if dp else device)
        out = out_root / recipe
        if recipe == "peft":
            res = train_peft_lora(base, tok, records, cfg, steps=6, out_dir=out / "adapter", dp=dp)
            params = {n: p for n, p in base.named_parameters() if "lora_" in n}
        else:
            mm = build_mixture(cfg, "moa", base, "tiny")
            res = train_mixture(mm, tok, records, cfg, steps=6, lr=1e-2, train_experts=True, train_routers=True,
                                route="gold", eta=0.1, dp=dp)
            params = mm.mixture_parameters()
        if dp is None or dp.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "history.json").write_text(json.dumps({"history": res.history, "tokens": res.tokens,
                                                           "world_size": dp.world_size if dp else 1,
                                                           "device": str(base.device)}))
            print(f"{recipe}: world {dp.world_size if dp else 1} on {base.device}, "
                  f"losses {[round(h['loss'], 5) for h in res.history]}, {res.tokens_per_second:.0f} tokens/s")
            save_file({n: p.detach().cpu().contiguous() for n, p in params.items()}, out / "params.safetensors")
    shutdown(dp)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
