"""The registered model: an MLflow pyfunc that routes each prompt to an expert and generates.

Input: a DataFrame with a `prompt` column and an optional `domain` column (force that expert).
Output: a DataFrame with `text` (the generated answer) and `expert` (the expert that answered).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd


def signature(max_new_tokens: int):
    """The model's input/output schema, with `max_new_tokens` as an inference parameter: MLflow drops any
    `params` (pyfunc predict and REST `"params": {...}`) of a model whose signature declares none."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "domain", required=False)]),
        outputs=Schema([ColSpec("string", "text"), ColSpec("string", "expert")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", int(max_new_tokens))]),
    )


def _bad_request(message: str) -> Exception:
    """A caller's mistake: MLflow's scoring server answers an MlflowException with INVALID_PARAMETER_VALUE as
    HTTP 400 whose `message` carries this text (any other exception becomes a generic 400 with the reason
    buried in `stack_trace`)."""
    from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class MoAPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from moa_core.base_model import resolve_device
        from moa_core.model import load_mixture

        cfg = context.model_config
        base_dir = context.artifacts.get("base") or cfg["base_path"]
        if not Path(base_dir).is_dir():
            raise FileNotFoundError(
                f"this model version was registered without its base model and expects it at {base_dir}, which is "
                f"not on this machine. Copy the base model ({cfg.get('base_model')}) there, or register the model "
                "again with `registry.include_base: true` in params.yaml so that the version carries it.")
        self.tok = AutoTokenizer.from_pretrained(base_dir)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        # serves on the GPU when the serving host has one (base_model.device: auto), else on the CPU
        self.device = resolve_device(cfg.get("device", "auto"))
        self.mm = load_mixture(base.to(self.device), context.artifacts["mixture"]).eval()
        self.max_new_tokens = int(cfg.get("max_new_tokens", 64))
        self.max_length = int(cfg.get("max_length", 256))

    # `pd.DataFrame`: a type hint MLflow accepts without inferring a schema from it (`Any` made it warn on every
    # load); the schema is the logged signature
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        import torch

        from moa_core.batching import collate, encode_prompt, to_device

        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "prompt" not in df.columns:
            raise _bad_request(f"input needs a 'prompt' column (and optionally 'domain'); got columns {list(df.columns)}")
        max_new = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        experts = self.mm.spec.experts
        forced = None
        if "domain" in df.columns and df["domain"].notna().all():
            unknown = sorted(set(df["domain"]) - set(experts))
            if unknown:
                raise _bad_request(f"unknown domain(s) {unknown}; this model knows the domains {experts}: send one "
                                   "of them, or leave `domain` out to let the router choose")
            forced = torch.tensor([experts.index(d) for d in df["domain"]], device=self.device)
        prompts = [encode_prompt(self.tok, p, self.max_length) for p in df["prompt"].astype(str)]
        b = to_device(collate([{"input_ids": p} for p in prompts], self.tok.pad_token_id, left_pad=True), self.device)
        seqs, chosen = self.mm.generate(b["input_ids"], b["attention_mask"], expert=forced, max_new_tokens=max_new,
                                        do_sample=False, pad_token_id=self.tok.pad_token_id,
                                        eos_token_id=self.tok.eos_token_id)
        texts = self.tok.batch_decode(seqs[:, b["input_ids"].shape[1]:], skip_special_tokens=True)
        names = [experts[i] for i in chosen.tolist()] if chosen is not None else ["(token-level mixture)"] * len(texts)
        return pd.DataFrame({"text": [t.strip() for t in texts], "expert": names})
