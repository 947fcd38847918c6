"""`moa generate`: ask the trained or registered model from the terminal.

Nothing here imports Prefect: one generation loads the model and answers, without starting a Prefect server.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    app.command()(generate)


def _prompts(given: list[str]) -> list[str]:
    if given:
        return given
    if sys.stdin.isatty():
        console.print("[red]no prompt[/red]: give prompts as arguments, or one per line on stdin "
                      "(echo 'What is fever?' | moa generate)")
        raise typer.Exit(2)
    return [line.strip() for line in sys.stdin if line.strip()]


def _registered(ctx, uri: str, label: str, prompts: list[str], expert: str | None, max_new: int) -> list[dict]:
    """Answers of a registered version (or a run's logged model) through its pyfunc: what serving returns."""
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from tasks.common import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(ctx))
    try:
        model = mlflow.pyfunc.load_model(uri)
    except MlflowException as exc:
        console.print(f"[red]cannot load {label}[/red] ({uri}): {exc.message.splitlines()[0]}\n"
                      "Register a model with `moa run`, pick another with --version/--run, or try the trained "
                      "mixture on disk with --local.")
        raise typer.Exit(2) from None
    frame = pd.DataFrame({"prompt": prompts, **({"domain": [expert] * len(prompts)} if expert else {})})
    try:
        out = model.predict(frame, params={"max_new_tokens": max_new})
    except ValueError as exc:  # e.g. an unknown --expert
        console.print(f"[red]cannot generate[/red]: {exc}")
        raise typer.Exit(2) from None
    return [{k: (None if v != v else v) for k, v in row.items()} for row in out.to_dict(orient="records")]  # NaN -> None


def _local(ctx, prompts: list[str], expert: str | None, max_new: int) -> list[dict]:
    """Answers of the trained mixture in models/mixture/<method>, loaded directly."""
    from moa_core.answer import answer
    from moa_core.base_model import load_base
    from moa_core.model import MixtureError, load_mixture

    base, tok, _ = load_base(ctx.cfg.base_model, ctx.root)
    try:
        mm = load_mixture(base, ctx.layout.mixture(ctx.cfg.method))
        mm.configure_decoding(**ctx.cfg.serve.model_dump())
        answers = answer(mm, tok, prompts, max_length=ctx.cfg.train.max_length, max_new_tokens=max_new,
                         threshold=mm.spec.fallback_threshold, forced=[expert] * len(prompts) if expert else None,
                         batch_size=ctx.cfg.evaluate.batch_size)
    except (MixtureError, ValueError) as exc:
        console.print(f"[red]cannot generate[/red]: {exc}")
        raise typer.Exit(2) from None
    return [a.as_dict() for a in answers]


def generate(
    prompts: Annotated[Optional[list[str]], typer.Argument(help="instructions; none: one per line from stdin")] = None,
    version: Annotated[Optional[str], typer.Option(help="a registered version number (default: @champion)")] = None,
    run: Annotated[Optional[str], typer.Option(help="the model logged by this MLflow run id")] = None,
    local: Annotated[bool, typer.Option("--local", help="the trained mixture in models/mixture/<method>, "
                                                         "not the registry")] = False,
    expert: Annotated[Optional[str], typer.Option(help="answer with this expert (or 'base'), skipping the router")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(min=1, help="default: evaluate.max_new_tokens")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per prompt and line, for scripts")] = False,
    params: Annotated[Path, typer.Option("--params", "-p", help="path to params.yaml")] = Path("params.yaml"),
) -> None:
    """Answer prompts with the registered model (@champion by default) or the trained mixture, showing the
    expert that answered and the router's confidence ("base": the router was unsure and the base model
    answered). Example: moa generate "What is fever?" "def add(a, b):" --json"""
    if sum(x is not None for x in (version, run)) + local > 1:
        console.print("[red]choose one model[/red]: --version, --run or --local")
        raise typer.Exit(2)
    from .main import _ctx

    ctx = _ctx(params)
    texts = _prompts(prompts or [])
    max_new = max_new_tokens or ctx.cfg.evaluate.max_new_tokens
    name = ctx.cfg.registry.model_name
    if local:
        label, rows = f"trained mixture {ctx.layout.mixture(ctx.cfg.method)}", _local(ctx, texts, expert, max_new)
    else:
        uri, label = ((f"runs:/{run}/moa-model", f"run {run}") if run else
                      (f"models:/{name}/{version}", f"{name} v{version}") if version else
                      (f"models:/{name}@champion", f"{name}@champion"))
        rows = _registered(ctx, uri, label, texts, expert, max_new)
    for prompt, row in zip(texts, rows):
        if as_json:
            print(json.dumps({"prompt": prompt, **row, "model": label}))
            continue
        c = row.get("confidence")
        conf = f"confidence {c:.2f}" if c is not None else "forced" if expert else "routed per token"
        console.print(f"[bold]{row['expert']}[/bold] ({conf}) [dim]{prompt[:60]!r}[/dim]")
        print(row["text"])
