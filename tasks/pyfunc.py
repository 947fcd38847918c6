"""The registered model: an MLflow pyfunc that routes each prompt to an expert and generates.

Input: a DataFrame with a `prompt` column and an optional `domain` column (force that expert, "universal" for
MoDULA, or "base"; empty = route).
Output: a DataFrame with `text` (the generated answer), `expert` (the expert that answered: "base" or
"universal" when the router was unsure and fell back) and `confidence` (the router's; null where forced).
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
        outputs=Schema([ColSpec("string", "text"), ColSpec("string", "expert"),
                        ColSpec("double", "confidence", required=False)]),
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
        from moa_core.config import ServeConfig
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
        # params.yaml's `serve` section at registration (versions registered before it: its defaults)
        self.mm.configure_decoding(**ServeConfig(**cfg.get("serve", {})).model_dump())
        self.max_new_tokens = int(cfg.get("max_new_tokens", 64))
        self.max_length = int(cfg.get("max_length", 256))

    # `pd.DataFrame`: a type hint MLflow accepts without inferring a schema from it (`Any` made it warn on every
    # load); the schema is the logged signature
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from moa_core.answer import answer, expert_names

        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "prompt" not in df.columns:
            raise _bad_request(f"input needs a 'prompt' column (and optionally 'domain'); got columns {list(df.columns)}")
        max_new = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        forced = None
        if "domain" in df.columns:
            forced = [d if isinstance(d, str) and d else None for d in df["domain"]]
            known = expert_names(self.mm)
            unknown = sorted({d for d in forced if d is not None} - set(known))
            if unknown:
                raise _bad_request(f"unknown domain(s) {unknown}; this model knows the domains {known}: send one "
                                   "of them, or leave `domain` out to let the router choose")
        answers = answer(self.mm, self.tok, list(df["prompt"].astype(str)), max_length=self.max_length,
                         max_new_tokens=max_new, threshold=self.mm.spec.fallback_threshold, forced=forced)
        return pd.DataFrame({"text": [a.text for a in answers], "expert": [a.expert for a in answers],
                             # object dtype keeps None (forced rows) as JSON null instead of NaN
                             "confidence": pd.Series([a.confidence for a in answers], dtype=object)})
