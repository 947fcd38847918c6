"""moa_core: the modeling library of moa (torch, transformers, peft, safetensors only).

Mixture-of-LoRA-experts layers (MoA, MoSLD, MoDULA), their training recipes, data curation rules and
evaluation metrics. No Prefect, MLflow or DVC here: those live in `tasks/` and `flows/`.
"""

__version__ = "0.1.0"
