"""Host-side work of one training step: the aten operators it dispatches, counted per step (forward + backward).

On an H200 a SmolLM2 training step is host-bound (eager PyTorch: each operator costs microseconds of Python and
dispatch whatever the tensor sizes), so the operator count bounds what a step can cost there better than FLOPs.
Three steps on the same mixed-domain rows (one row per domain, --tokens each), on the CPU:

  base   the frozen base model, gradients of the activations only (what any adapter's step pays at least);
  peft   one PEFT LoRA adapter on the same targets (r, alpha, dropout as bench_training.py);
  moa    moa_core's MixtureModel with --experts experts, each row through its domain's expert (stage 1's step),
         each row's A and B gathered (any row order);
  moa_blocks  the same step with the rows in expert-major blocks (`expert_blocks=True`, as train_mixture orders
         them when the experts divide the batch): each expert applied to its block's view, no gathers, and the
         projections that read one input (q/k/v, gate/up) run together (lora_kernels.blocked_group).

Operators that only make a tensor header (views, empty allocations) are counted apart: on an accelerator the others
each launch a kernel.

The count depends on the layer count and the wrapped projections, not on the widths, so the model is the SmolLM2
layout (30 layers, 7 wrapped projections each) at a small width. The optimiser step is not counted; the gradient
clip is, apart (MoA's per-expert clip in both its forms, PEFT's clip_grad_norm_).

Example:  python bench/count_training_ops.py --experts 8
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402,I001  (first: puts the repo root on sys.path for moa_core)
from _common import LORA_ALPHA, LORA_R, TARGETS, build_base, clone, moa_spec  # noqa: E402
from bench_training import DROPOUT, make_rows, moa_batches  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


class OpCounter(TorchDispatchMode):
    """Counts every aten operator dispatched inside the `with` block, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.views = 0  # of which only views and allocations

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        if func.is_view or func.overloadpacket in NO_KERNEL:
            self.views += 1
        return func(*args, **(kwargs or {}))


# operators that only make a tensor header (no kernel on an accelerator), besides those torch marks as views
NO_KERNEL = {torch.ops.aten._unsafe_view, torch.ops.aten.empty_like, torch.ops.aten.empty, torch.ops.aten.detach}


def count(step) -> OpCounter:
    step()  # warm-up: lazy initialisation is not part of a steady-state step
    with OpCounter() as c:
        step()
    return c


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args(argv)
    _common.SHAPES["smollm2_narrow"] = dict(_common.SHAPES["smollm2"], hidden_size=72, intermediate_size=192,
                                           vocab_size=1024)
    dev = torch.device("cpu")
    base = build_base("smollm2_narrow", dev, torch.float32, seed=0)
    batch = moa_batches(make_rows(args.experts, 1, args.tokens, 1024, dev), 1, 1, dev)[0]
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]

    frozen = clone(base).requires_grad_(False)

    def base_step():
        emb = frozen.get_input_embeddings()(ids).detach().requires_grad_()
        frozen(inputs_embeds=emb, attention_mask=mask, labels=labels).loss.backward()

    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(clone(base), LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=DROPOUT,
                                                target_modules=list(TARGETS), task_type="CAUSAL_LM"))
    pm.train()

    def peft_step():
        pm(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()

    from moa_core.model import MixtureModel

    mm = MixtureModel(clone(base), moa_spec(base, args.experts, dropout=DROPOUT))
    mm.train()
    mm.model.eval()
    for w in mm.wrapped.values():
        w.train()
    mm.set_trainable(experts=True)

    def moa_step():
        mm(ids, mask, labels=labels, expert=batch["expert"]).loss.backward()

    def moa_blocks_step():
        mm(ids, mask, labels=labels, expert=batch["expert"], expert_blocks=True).loss.backward()

    totals = {}
    print(f"aten operators per training step (forward + backward), {len(mm.wrapped)} wrapped projections, "
          f"{args.experts} rows x {args.tokens} tokens:")
    steps = {"base": base_step, "peft": peft_step, "moa": moa_step, "moa_blocks": moa_blocks_step}
    for name, step in steps.items():
        c = count(step)
        totals[name] = sum(c.counts.values())
        top = ", ".join(f"{k.removeprefix('aten.')} {v}" for k, v in c.counts.most_common(5))
        print(f"  {name:10s} {totals[name]:6d}, {totals[name] - c.views:6d} not views or allocations   ({top})")
    for name in ("peft", "moa", "moa_blocks"):
        extra = totals[name] - totals["base"]
        print(f"  {name} adds {extra} operators to the base's, {extra / len(mm.wrapped):.1f} per wrapped projection")
    # after the backward, the one pass clips each expert's gradient on its own (train.clip_per_expert); PEFT's
    # clip_grad_norm_ for comparison
    from moa_core.train import clip_grads_per_expert, expert_token_shares

    stacked = mm.per_expert_parameters()
    shares = expert_token_shares(batch["expert"], labels, args.experts)
    print("aten operators of the gradient clip after that step:")
    for concat in (False, True):
        c = count(lambda: clip_grads_per_expert(stacked, [], 1.0, shares, concat=concat))  # noqa: B023
        print(f"  moa per-expert clip, {'one concatenation (accelerators)' if concat else 'norms per gradient (CPU)'}: "
              f"{sum(c.counts.values())}, {sum(c.counts.values()) - c.views} not views or allocations")
    lora = [p for p in pm.parameters() if p.requires_grad]
    c = count(lambda: torch.nn.utils.clip_grad_norm_(lora, 1.0))
    print(f"  peft clip_grad_norm_ (foreach): {sum(c.counts.values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
