"""`moa`: run the pipeline, run one stage (what dvc.yaml calls), check the config, open the UIs."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="moa: train one LoRA expert per domain and a router over them (MoA / MoSLD / MoDULA), "
    "orchestrated by Prefect, tracked by MLflow and DVC. Configuration: params.yaml.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
stage_app = typer.Typer(help="Run one pipeline stage alone (dvc.yaml's commands). Reads params.yaml.", no_args_is_help=True)
app.add_typer(stage_app, name="stage")
console = Console(stderr=True)

Params = Annotated[Path, typer.Option("--params", "-p", help="path to params.yaml")]
Profile = Annotated[Optional[str], typer.Option("--profile", help="merge profiles.<name> from params.yaml, e.g. quick")]


def _env(params: Path) -> None:
    from tasks.common import configure_env

    configure_env(params.resolve().parent)


def _ctx(params: Path, profile: str | None = None):
    from moa_core.config import ConfigError
    from tasks.common import StageContext

    _env(params)
    try:
        return StageContext.load(params, profile)
    except ConfigError as exc:
        console.print(f"[red]config error[/red]: {exc}")
        raise typer.Exit(2) from None


LOCK_HELD_ENV = "MOA_PROJECT_LOCK_HELD"  # set by the torchrun launcher, which keeps holding the lock


def _stage_ctx(params: Path, stage: str, ctx=None):
    """_ctx + the project lock, held until this `moa stage` process exits (a DVC stage is one process).
    torchrun ranks started by `--nproc-per-node` run under the launcher's lock; started by hand, rank 0 takes it."""
    from moa_core.distributed import is_main_process
    from tasks.common import project_lock

    ctx = ctx or _ctx(params)
    held = os.environ.get(LOCK_HELD_ENV) == str(ctx.root)
    if not held and is_main_process():
        _held.enter_context(project_lock(ctx.root, f"moa stage {stage}"))
    return ctx


_held = contextlib.ExitStack()

NProc = Annotated[int, typer.Option(
    "--nproc-per-node", min=1,
    help="train data-parallel in N processes with torch DDP, launched through torchrun: one per GPU (NCCL), or CPU "
         "processes (gloo). train.batch_size must divide by N; the loss curve is the one-process curve "
         "(exactly so without dropout).")]


def _torchrun(ctx, stage: str, nproc: int) -> None:
    """`moa stage ... --nproc-per-node N` (N > 1): take the project lock, then replace this process with torchrun
    running N copies of the same command. The lock's file descriptor survives the exec, so torchrun holds it
    for the whole group; each copy joins the process group (moa_core.distributed), and rank 0 logs and saves."""
    from tasks.common import project_lock

    if ctx.cfg.train.batch_size % nproc:
        console.print(f"[red]config error[/red]: train.batch_size={ctx.cfg.train.batch_size} does not split over "
                      f"{nproc} processes; set it to a multiple of {nproc} or change --nproc-per-node.")
        raise typer.Exit(2)
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip or a.startswith("--nproc-per-node="):
            skip = False
            continue
        if a == "--nproc-per-node":
            skip = True
            continue
        args.append(a)
    _held.enter_context(project_lock(ctx.root, f"moa stage {stage} (torchrun, {nproc} processes)", inheritable=True))
    console.print(f"torchrun: {nproc} processes of `moa {' '.join(args)}`")
    sys.stderr.flush()
    os.environ[LOCK_HELD_ENV] = str(ctx.root)
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc-per-node={nproc}", "-m", "moa_cli.main", *args])


def _print_result(result: dict) -> None:
    from moa_core.distributed import is_main_process

    if is_main_process():  # torchrun's helper ranks have nothing to report
        console.print_json(json.dumps(result))


@app.command()
def validate(params: Params = Path("params.yaml"), profile: Profile = None) -> None:
    """Check params.yaml and print the resolved settings."""
    ctx = _ctx(params, profile)
    t = Table(title=f"{params} ({profile or 'default'})")
    t.add_column("setting")
    t.add_column("value")
    t.add_row("method", ctx.cfg.method)
    t.add_row("base model", ctx.cfg.base_model.source)
    t.add_row("domains", ", ".join(ctx.cfg.domain_names))
    t.add_row("steps (expert / mixed / joint)", f"{ctx.cfg.train.expert_steps} / {ctx.cfg.train.mixed_steps} / {ctx.cfg.train.joint_steps}")
    console.print(t)
    console.print("[green]params OK[/green]")


@app.command()
def run(params: Params = Path("params.yaml"), profile: Profile = None,
        expert_deployment: Annotated[Optional[str], typer.Option(
            help="train each domain's expert as its own flow run of this deployment on its work pool, e.g. "
                 "moa_train_expert/process (python -m flows.dispatch deploy; infra/README.md)")] = None) -> None:
    """Run the whole pipeline as one Prefect flow (curate, train experts, train router, evaluate, register)."""
    ctx = _ctx(params, profile)
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.pipeline import moa_pipeline

    console.print(f"[bold]moa_pipeline[/bold]: method={ctx.cfg.method}, domains={ctx.cfg.domain_names}, "
                  f"profile={profile or 'default'}; progress is logged below and in the Prefect UI (moa ui).")
    flow = moa_pipeline.with_options(task_runner=ThreadPoolTaskRunner(max_workers=max(2, ctx.cfg.train.parallel_jobs)))
    result = flow(params=str(params.resolve()), profile=profile, expert_deployment=expert_deployment)
    print(result["evaluation"]["table"])  # plain print: a markdown table must not be re-wrapped
    print(f"\nWith 95 % intervals ({len(ctx.seeds)} seed(s); reports/eval_intervals.md):\n")
    print(result["intervals_table"])
    reg = result["registered"]
    console.print(
        f"\n[green]done[/green]: MLflow run {result['mlflow_run_id']}, model {reg['model']} v{reg['version']} "
        f"({'promoted to @champion' if reg['promoted'] else 'not promoted: ' + reg['reason']}).\n"
        f"Report: {ctx.layout.reports / 'eval.md'}. Browse runs: `moa ui` then http://127.0.0.1:5000"
    )


def _evaluate(params: Path, profile: str | None, holder: str) -> None:
    from moa_core.model import MixtureError
    from tasks.evaluate import run_evaluate

    ctx = _stage_ctx(params, holder, _ctx(params, profile))
    try:
        result = run_evaluate(ctx)
    except FileNotFoundError as exc:
        console.print(f"[red]nothing to evaluate yet[/red]: {exc}\nRun `moa run{' --profile ' + profile if profile else ''}` first.")
        raise typer.Exit(2) from None
    except MixtureError as exc:
        console.print(f"[red]cannot evaluate[/red]: {exc}")
        raise typer.Exit(2) from None
    print(result["table"])  # plain print: a markdown table must not be re-wrapped
    console.print(f"Report: {ctx.layout.reports / 'eval.md'}. Browse runs: `moa ui` then http://127.0.0.1:5000")


@app.command()
def evaluate(params: Params = Path("params.yaml"), profile: Profile = None) -> None:
    """Evaluate the trained systems on the held-out test split: the comparison table (base, single-LoRA oracle,
    LoRA-mixed, the method, and the baselines/compare_methods of evaluate: in params.yaml) -> reports/eval.md,
    metrics/eval.json, and an MLflow run with the table, confusion matrix and plots. Trains nothing: run
    `moa run` (with the same --profile) first. Example: moa evaluate --profile compare"""
    _evaluate(params, profile, "evaluate")


def _field_map(values: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        ours, sep, theirs = v.partition("=")
        if not sep or not ours or not theirs:
            raise typer.BadParameter(f"--field {v!r}: write it as OURS=THEIRS, e.g. --field instruction=question")
        out[ours.strip()] = theirs.strip()
    return out


@app.command()
def onboard(
    domain: Annotated[str, typer.Option("--domain", "-d", help="name of the new domain (lowercase, digits, _)")],
    source: Annotated[str, typer.Option("--source", "-s", help="a local .jsonl/.json/.parquet/.csv file, builtin:NAME[/CATEGORY] (e.g. builtin:bbc/tech), or a dataset id in the local HF cache")],
    field: Annotated[list[str], typer.Option("--field", "-f", help="column mapping OURS=THEIRS (instruction, response, input, id); repeatable")] = [],  # noqa: B006
    description: Annotated[str, typer.Option(help="one line for the data card and params.yaml")] = "",
    params: Params = Path("params.yaml"),
    profile: Profile = None,
) -> None:
    """Add a domain to the trained mixture without retraining the others (one more expert + a router update).

    The old experts stay bit-identical; every old domain is re-evaluated, and the new model version becomes
    @champion (and the domain is written into params.yaml) only if none regressed beyond onboard.tolerance.
    Example: moa onboard -d law -s data/raw/law.jsonl -f instruction=question -f response=answer"""
    from moa_core.config import ConfigError
    from moa_core.data import EmptyDomainError
    from moa_core.onboard import OnboardError
    from moa_core.sources import SourceError

    _ctx(params, profile)  # params.yaml itself must be valid first
    fields = _field_map(field)
    from flows.onboard import onboard_domain

    try:
        result = onboard_domain(domain=domain, source=source, fields=fields or None, description=description,
                                params=str(params.resolve()), profile=profile)
    except (OnboardError, ConfigError, SourceError, EmptyDomainError) as exc:
        console.print(f"[red]onboarding {domain!r} stopped before training[/red]: {exc}\n"
                      "params.yaml and the model registry are unchanged.")
        raise typer.Exit(2) from None
    ev, reg, cost = result["evaluation"], result["registered"], result["cost"]
    t = Table(title=f"onboard {domain}: {ev['metric']} per domain, before -> after (test split)")
    for col in ("domain", "before", "after", "router acc"):
        t.add_column(col)
    acc = ev["router_accuracy_by_domain"]
    for d, vals in ev["after"].items():
        before = ev["before"].get(d, {}).get(ev["metric"])
        t.add_row(d, "-" if before is None else f"{before:.3f}", f"{vals[ev['metric']]:.3f}",
                  f"{acc[d]:.0%}" if d in acc else "-")
    console.print(t)
    console.print(
        f"cost: {cost['onboard_train_seconds']} s and {cost['onboard_trainable_params']:,} trainable parameters "
        f"(the last full pipeline trained {cost['pipeline_train_seconds_old_domains']} s; the whole mixture has "
        f"{cost['full_mixture_trainable_params']:,})\n"
        + (f"[green]promoted[/green]: {reg['model']} v{reg['version']} is @champion and params.yaml lists {domain!r}; "
           "`dvc repro` and scheduled retrains include it from now on."
           if reg["promoted"] else
           f"[yellow]not promoted[/yellow]: {reg['model']} v{reg['version']} registered, {ev['reason']}. "
           "params.yaml and @champion are unchanged; try more data or onboard.router_steps, then onboard again.")
    )


@app.command()
def export(
    method: Annotated[Optional[str], typer.Option(help="which trained mixture (default: params.yaml's method)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="output folder (default: models/export/<method>)")] = None,
    params: Params = Path("params.yaml"),
) -> None:
    """Write each expert of the trained MoA mixture as a PEFT LoRA adapter folder (vLLM, SGLang, LoRAX and
    PeftModel.from_pretrained load it by name) and the router as router.safetensors + router.json, which
    moa_core.standalone_router loads to map a prompt to an expert name (README: "Serving the experts elsewhere")."""
    from moa_core.base_model import resolve_base_path
    from moa_core.export import export_mixture
    from moa_core.model import MixtureError, read_spec

    ctx = _ctx(params)
    method = method or ctx.cfg.method
    src, dest = ctx.layout.mixture(method), out or ctx.layout.export(method)
    try:
        threshold = read_spec(src).fallback_threshold if (src / "mixture.json").exists() else None
        meta = export_mixture(src, dest, base_model_path=resolve_base_path(ctx.cfg.base_model, ctx.root)[0],
                              fallback_threshold=threshold)
    except MixtureError as exc:
        console.print(f"[red]cannot export[/red]: {exc}")
        raise typer.Exit(2) from None
    console.print(f"[green]exported[/green] {len(meta['experts'])} adapters ({', '.join(meta['experts'])}) and the "
                  f"router to {dest}")
    print(json.dumps({"out": str(dest), **{k: meta[k] for k in ("experts", "adapters", "fallback_threshold")}}))


@stage_app.command("curate")
def stage_curate(domain: str, params: Params = Path("params.yaml")) -> None:
    """Curate one domain -> data/curated/<domain>/."""
    from tasks.curate import run_curate

    console.print_json(json.dumps(run_curate(_stage_ctx(params, f"curate {domain}"), domain)))


def _train_ctx(params: Path, stage: str, nproc: int, side_by_side: bool = False):
    """side_by_side: the stage runs beside its peers (one expert per domain), so it takes its share of the
    cores (train.parallel_jobs); torchrun ranks also split them."""
    from moa_core.distributed import launched_by_torchrun
    from tasks.common import set_torch_threads

    ctx = _ctx(params)
    if nproc > 1 and not launched_by_torchrun():
        _torchrun(ctx, stage, nproc)  # does not return
    ctx = _stage_ctx(params, stage, ctx)
    if side_by_side or launched_by_torchrun():
        set_torch_threads(ctx.cfg, jobs=ctx.cfg.train.parallel_jobs if side_by_side else 1)
    return ctx


@stage_app.command("train-expert")
def stage_train_expert(domain: str, params: Params = Path("params.yaml"), nproc_per_node: NProc = 1) -> None:
    """Stage 1: a PEFT LoRA for one domain -> models/experts/<domain>/."""
    from tasks.train_expert import run_train_expert

    _print_result(run_train_expert(_train_ctx(params, f"train-expert {domain}", nproc_per_node, side_by_side=True), domain))


@stage_app.command("train-mixed")
def stage_train_mixed(params: Params = Path("params.yaml"), nproc_per_node: NProc = 1) -> None:
    """The LoRA-mixed baseline: one LoRA on all domains -> models/mixed/."""
    from tasks.train_expert import run_train_mixed

    _print_result(run_train_mixed(_train_ctx(params, "train-mixed", nproc_per_node)))


@stage_app.command("train-router")
def stage_train_router(params: Params = Path("params.yaml"), nproc_per_node: NProc = 1) -> None:
    """The method's mixture (MoA stage 2 / MoSLD / MoDULA) -> models/mixture/<method>/."""
    from tasks.train_router import run_train_router

    _print_result(run_train_router(_train_ctx(params, "train-router", nproc_per_node)))


@stage_app.command("evaluate")
def stage_evaluate(params: Params = Path("params.yaml")) -> None:
    """Evaluate every system on the test split -> metrics/eval.json, reports/eval.md (`moa evaluate`, as DVC runs it)."""
    _evaluate(params, None, "evaluate")


@stage_app.command("register")
def stage_register(params: Params = Path("params.yaml")) -> None:
    """Register the mixture in the MLflow Model Registry; move @champion only if not worse."""
    from tasks.register import run_register

    console.print_json(json.dumps(run_register(_stage_ctx(params, "register"))))


@app.command()
def ui(params: Params = Path("params.yaml"), port: int = 5000, host: str = "127.0.0.1",
       prefect: Annotated[bool, typer.Option(help="also start the Prefect UI (server) on --prefect-port")] = False,
       prefect_port: int = 4200) -> None:
    """Start the MLflow UI (and optionally the Prefect UI) on loopback."""
    from tasks.common import tracking_uri

    ctx = _ctx(params)
    procs = []
    if prefect:
        # `--port` alone leaves the UI calling the API on PREFECT_SERVER_API_PORT (4200) or $PREFECT_API_URL
        api_env = {**os.environ, "PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(prefect_port),
                   "PREFECT_UI_API_URL": f"http://{host}:{prefect_port}/api"}
        procs.append(subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", host,
                                       "--port", str(prefect_port)], env=api_env))
        console.print(f"Prefect UI: http://{host}:{prefect_port}")
    console.print(f"MLflow UI: http://{host}:{port}  (Ctrl-C to stop)")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    try:
        subprocess.run([sys.executable, "-m", "mlflow", "ui", "--host", host, "--port", str(port), "--workers", "1",
                        "--backend-store-uri", tracking_uri(ctx)], env=env, check=False)
    finally:
        for p in procs:
            p.terminate()


from moa_cli import deploy_cmd  # noqa: E402  `moa deploy`

deploy_cmd.register(app)
from moa_cli import generate_cmd  # noqa: E402  `moa generate`

generate_cmd.register(app)

if __name__ == "__main__":
    app()
