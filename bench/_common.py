"""Shared helpers of the bench scripts: model shapes, device/dtype, timing, memory, tables.

Imports only the standard library, torch, transformers, peft and moa_core (the GPU machine has no
prefect/mlflow/dvc/datasets). moa_core.train needs pydantic (through moa_core.config); where pydantic
is missing the scripts fall back to building the MixtureSpec / train settings by hand, and say so.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/x.py` from the repo root, moa_core not installed
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R, LORA_ALPHA = 8, 16.0  # params.yaml lora.r / lora.alpha -> scaling 2.0

# Llama-architecture shapes (random init from a config; nothing is downloaded).
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # tiny's width with Qwen2-0.5B's 24 layers: a compiled step's host work (guards, launches) at full depth, cheaply
    "tiny24": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=24,
                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # SmolLM2-135M(-Instruct)
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0),
    # Qwen2-0.5B-class shapes on the Llama architecture (no q/k/v bias)
    "qwen0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0),
}

try:  # moa_core.config -> pydantic
    from moa_core.config import TrainConfig, parse_config
    HAVE_TRAIN = True
    TRAIN_IMPORT_ERROR = ""
except ImportError as exc:  # pragma: no cover - depends on the machine
    HAVE_TRAIN = False
    TrainConfig = parse_config = None  # type: ignore[assignment,misc]
    TRAIN_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def pick_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def build_base(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A random-init LlamaForCausalLM of the named shape, on `device` in `dtype`, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      **SHAPES[shape])
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.to(device=device, dtype=dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def moa_spec(base: nn.Module, n_experts: int, dropout: float = 0.0):
    """The MoA MixtureSpec for `n_experts` domains: through moa_core.methods.spec_from_config (the pipeline's
    own path) when pydantic is there, else the same fields by hand."""
    from moa_core.model import MixtureSpec, base_config_hash, decoder_layers

    names = [f"d{k}" for k in range(n_experts)]
    if HAVE_TRAIN:
        from moa_core.methods import spec_from_config

        raw = {"domains": {n: {"source": {"kind": "builtin", "name": "humaneval"}} for n in names},
               "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": dropout, "target_modules": TARGETS}}
        return spec_from_config(parse_config(raw, "bench"), "moa", base, "bench-random-init")
    L = len(decoder_layers(base))
    return MixtureSpec(method="moa", experts=names, experts_per_layer=[n_experts] * L, target_modules=list(TARGETS),
                       r=LORA_R, scaling=LORA_ALPHA / LORA_R, routing="sequence", dropout=dropout,
                       base_model="bench-random-init", base_config_hash=base_config_hash(base.config),
                       domains=list(names))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# ------------------------------------------------------------------------------------------- memory
def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of one measured section.

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats (bytes held by tensors).
    CPU: the process's peak resident set size (VmHWM of /proc/self/status) after resetting the
    high-water mark (`echo 5 > /proc/self/clear_refs`), minus the resident size when the section
    began (after glibc's malloc_trim(0) returned freed heap pages): the extra RSS the section needed. Where the reset is refused, the delta of
    resource.getrusage(RUSAGE_SELF).ru_maxrss is used instead (a lower bound: it cannot go below an
    earlier peak) and `method` says so."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = ""
        self.start = 0
        self.peak_bytes = 0
        self.total_bytes = 0

    def __enter__(self) -> "PeakMemory":
        import gc

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return self
        try:  # give freed heap pages back first, so that the section's own allocations show up as RSS growth
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.start = (_proc_status_kb("VmRSS") or 0) * 1024
            self.method = "VmHWM after clear_refs reset, minus VmRSS at start"
        except OSError:
            import resource

            self.start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.method = "ru_maxrss delta (lower bound)"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.total_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("VmHWM"):
            self.total_bytes = (_proc_status_kb("VmHWM") or 0) * 1024
        else:
            import resource

            self.total_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak_bytes = max(0, self.total_bytes - self.start)


# --------------------------------------------------------------------------------------------- report
def machine_info(device: torch.device) -> dict[str, Any]:
    import peft
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "device": str(device),
        "moa_core.train importable": HAVE_TRAIN,
    }
    if not HAVE_TRAIN:
        info["moa_core.train import error"] = TRAIN_IMPORT_ERROR
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sm_count=p.multi_processor_count,
                    cuda=torch.version.cuda)
    else:
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return info


def markdown_table(headers: list[str], rows: list[list[Any]], drop_empty: bool = True) -> str:
    """A markdown table; columns whose cells are all "-" (not measured in this run) are left out."""
    if drop_empty and rows:
        keep = [i for i in range(len(headers)) if any(r[i] != "-" for r in rows)]
        headers, rows = [headers[i] for i in keep], [[r[i] for i in keep] for r in rows]

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(headers))) + "|"]
    out += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=str))


def parse_int_list(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def shape_args(description: str | None, experts: str) -> argparse.ArgumentParser:
    """The command-line options every bench script shares: model shapes, device, dtype, expert counts."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", help=f"comma-separated, of {sorted(SHAPES)}")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32")
    ap.add_argument("--experts", default=experts, type=parse_int_list)
    # read by setup_shape (--threads) and run_shapes (--json, --render)
    ap.add_argument("--threads", default=0, type=int, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--json", default=None, help="write the results here too")
    ap.add_argument("--render", default=None, help="only print the tables of a --json file written earlier")
    return ap


def one_shape_args(doc: str, experts: int) -> argparse.ArgumentParser:
    """Options of the scripts that run one shape at one expert count (the profiles, the quality check): --shape,
    --device, --dtype, --threads, --experts, --json; the docstring's first paragraph is the description and the
    rest the epilog."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32")
    ap.add_argument("--threads", default=0, type=int, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--experts", default=experts, type=int, help="domains (experts)")
    ap.add_argument("--json", default=None, help="write the results here too")
    return ap


def run_shapes(args: Any, benchmark: str, run_shape: Callable[[Any], dict], render: Callable[[dict], str]) -> int:
    """The scripts' main loop: `--render FILE` reprints tables of an earlier --json; otherwise run every
    comma-separated --shape, print its table as it finishes, and write all runs to --json."""
    import argparse

    if args.render:
        for p in json.loads(Path(args.render).read_text())["runs"]:
            print(render(p))
        return 0
    payloads = []
    for shape in args.shape.split(","):
        a = argparse.Namespace(**{**vars(args), "shape": shape})
        print(f"[bench_{benchmark}] shape={shape}", file=sys.stderr, flush=True)
        p = run_shape(a)
        payloads.append(p)
        print(render(p), flush=True)
    write_json(args.json, {"benchmark": benchmark, "runs": payloads})
    return 0


def setup_shape(args: Any) -> tuple[torch.device, torch.dtype, nn.Module, int]:
    """(device, dtype, random-init base model of --shape, its vocabulary size) from the common options."""
    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    return device, dtype, build_base(args.shape, device, dtype, seed=0), SHAPES[args.shape]["vocab_size"]
