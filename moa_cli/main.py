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
from rich.markup import escape
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
Profile = Annotated[Optional[str], typer.Option("--profile", help="merge profiles.<name> from params.yaml, e.g. quick; several merge in order, e.g. gpu,from_mixed")]


def _env(params: Path) -> None:
    from tasks.common import configure_env

    configure_env(params.resolve().parent)


def _check_sources(ctx) -> None:
    """Open every domain's source cheaply (moa_core.sources.check_source); all problems at once, then exit 2."""
    from moa_core.sources import SourceError, check_source

    problems = []
    for d in ctx.cfg.domains:
        try:
            check_source(d.source, ctx.root)
        except SourceError as exc:
            problems.append(f"  - domains.{d.name}.source: {exc}")
    if problems:
        console.print("[red]source error[/red]:\n" + escape("\n".join(problems)), soft_wrap=True)
        raise typer.Exit(2)


def _ctx(params: Path, profile: str | None = None):
    from moa_core.config import ConfigError
    from tasks.common import StageContext

    _env(params)
    try:
        return StageContext.load(params, profile)
    except ConfigError as exc:
        console.print(f"[red]config error[/red]: {escape(str(exc))}")
        raise typer.Exit(2) from None


LOCK_HELD_ENV = "MOA_PROJECT_LOCK_HELD"  # set by the torchrun launcher, which keeps holding the lock


def _stage_ctx(params: Path, stage: str, ctx=None):
    """_ctx + the project lock, held until this `moa stage` process exits (a DVC stage is one process).
    torchrun ranks started by `--nproc-per-node` run under the launcher's lock; started by hand, rank 0 takes it."""
    from moa_core.ranks import is_main_process
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
    from moa_core.ranks import is_main_process

    if is_main_process():  # torchrun's helper ranks have nothing to report
        console.print_json(json.dumps(result))


@app.command()
def validate(params: Params = Path("params.yaml"), profile: Profile = None) -> None:
    """Check params.yaml (the base values, then with the profile) and open every domain's source cheaply
    (builtin names, files, formats, column mappings); print the resolved settings."""
    ctx = _ctx(params, profile)
    _check_sources(ctx)
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
                 "moa_train_expert/process (python -m flows.dispatch deploy; infra/README.md)")] = None,
        force: Annotated[bool, typer.Option(
            "--force", help="run every stage, also those whose inputs did not change since their last run")] = False,
        ) -> None:
    """Run the whole pipeline as one Prefect flow (curate, train experts, train router, evaluate, register).
    A stage whose inputs (source rows, its params.yaml keys, the base model, upstream outputs) did not change since
    its last successful run is skipped; --force retrains all. In a DVC project, a run without --profile then
    records dvc.lock, so `dvc status` agrees (README: Incremental retraining)."""
    ctx = _ctx(params, profile)
    _check_sources(ctx)  # seconds, before a Prefect server starts and the other domains curate
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.pipeline import moa_pipeline

    console.print(f"[bold]moa_pipeline[/bold]: method={ctx.cfg.method}, domains={ctx.cfg.domain_names}, "
                  f"profile={profile or 'default'}; progress is logged below and in the Prefect UI (moa ui).")
    flow = moa_pipeline.with_options(task_runner=ThreadPoolTaskRunner(max_workers=max(2, ctx.cfg.train.parallel_jobs)))
    with _stoppable(ctx, "moa run" + (f" --profile {profile}" if profile else "")):
        result = flow(params=str(params.resolve()), profile=profile, expert_deployment=expert_deployment, force=force)
    print(result["evaluation"]["table"])  # plain print: a markdown table must not be re-wrapped
    print(f"\nWith 95 % intervals ({len(ctx.seeds)} seed(s); reports/eval_intervals.md):\n")
    print(result["intervals_table"])
    reg = result["registered"]
    skipped = result["skipped"]
    console.print(
        f"\n[green]done[/green]: MLflow run {result['mlflow_run_id']}, model {reg['model']} v{reg['version']} "
        + ("(unchanged: no new version).\n" if reg.get("skipped") else
           f"({'promoted to @champion' if reg['promoted'] else 'not promoted: ' + escape(reg['reason'])}).\n")
        + (f"{len(skipped)} of {result['stage_runs']} stage runs unchanged, skipped (--force retrains all).\n"
           if skipped else "")
        + f"Report: {ctx.layout.reports / 'eval.md'}. Browse runs: `moa ui`, then the links it prints."
    )
    _record_in_dvc_lock(ctx, profile)


def _record_in_dvc_lock(ctx, profile: str | None) -> None:
    """After `moa run`, dvc.lock records what the flow wrote, so `dvc status` says up to date and `dvc repro` does
    not train it all again (`dvc commit --force --no-relink`: hashes the deps, params and outs as they are, runs nothing). Only for
    the run dvc.yaml describes: params.yaml without a profile (dvc.yaml reads params.yaml's plain values) and one
    training seed (dvc.yaml has the one-seed layout); in a DVC project (.dvc/ beside params.yaml) with dvc installed."""
    import shutil

    dvc = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")
    if not (ctx.root / ".dvc").is_dir() or not (ctx.root / "dvc.yaml").exists() or not Path(dvc).exists():
        return
    if profile or len(ctx.seeds) > 1:
        why = f"--profile {profile}" if profile else f"{len(ctx.seeds)} training seeds"
        console.print(f"dvc.lock not updated: this run used {why}, which dvc.yaml does not describe "
                      "(`dvc status` compares with params.yaml's plain values and one seed).")
        return
    done = subprocess.run([dvc, "commit", "--force", "--no-relink", "--quiet"], cwd=ctx.root, capture_output=True, text=True)
    if done.returncode != 0:
        console.print(f"[yellow]dvc.lock not updated[/yellow] (`dvc commit --force` exited {done.returncode}): "
                      f"{escape((done.stderr or done.stdout).strip()[-1500:])}", soft_wrap=True)
    else:
        console.print("dvc.lock records this run: `dvc status` is up to date.")


@contextlib.contextmanager
def _stoppable(ctx, rerun: str):
    """SIGINT/SIGTERM stop the running jobs at their next step boundary (moa_core.stopping); the command then
    exits with 130/143 after a normal interpreter exit, which stops the Prefect server it started."""
    from moa_core import stopping
    from tasks.common import announce_stop

    try:
        with stopping.stop_on_signals(announce_stop(ctx, rerun)):
            _start_prefect_server()
            yield
    except Exception as exc:
        if not stopping.stop_requested():
            raise
        code = stopping.exit_code()
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        console.print(f"[yellow]stopped[/yellow] ({stopping.stop_signal().name if stopping.stop_signal() else 'stop'}"
                      f"): {escape(detail)}\nThe checkpoints under {ctx.layout.checkpoints} resume with `{rerun}`.", soft_wrap=True)
        raise typer.Exit(code) from None


def _start_prefect_server() -> None:
    """Start Prefect's temporary API server now, as the flow run would at its start, but with SIGINT blocked in it.

    Ctrl-C in a terminal and coreutils `timeout` (infra/gpu/run_flow.sh) signal the whole process group: the server
    quit at once, and the stopping run then retried its last state reports, logs and events against a dead API until
    it was killed ("Unable to connect ... EventsWorker failed"). Blocked, the SIGINT stays pending in the server;
    Prefect still stops it at this process's exit (SIGTERM), and a SIGKILL of the group still ends it. A second
    signal, which ends this process without atexit, stops it first (stopping.at_kill). Nothing to start when
    PREFECT_API_URL names a running server."""
    import signal
    import threading

    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    from moa_core import stopping

    server = SubprocessASGIServer()  # the one instance Prefect's clients use when no API URL is set
    failed: list[BaseException] = []

    def start() -> None:  # in a thread of its own: the mask is per thread, and the server inherits this one's
        if hasattr(signal, "pthread_sigmask"):  # POSIX
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            server.start()
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread below
            failed.append(exc)

    starter = threading.Thread(target=start, name="moa-prefect-server")
    starter.start()
    starter.join()
    if failed:
        raise failed[0]

    def stop_server() -> None:
        if (proc := server.server_process) is not None:
            proc.terminate()

    stopping.at_kill(stop_server)


def _evaluate(params: Path, profile: str | None, holder: str) -> None:
    from moa_core.model import MixtureError
    from tasks.evaluate import run_evaluate

    ctx = _stage_ctx(params, holder, _ctx(params, profile))
    try:
        result = run_evaluate(ctx)
    except FileNotFoundError as exc:
        console.print(f"[red]nothing to evaluate yet[/red]: {escape(str(exc))}\nRun `moa run{' --profile ' + profile if profile else ''}` first.")
        raise typer.Exit(2) from None
    except MixtureError as exc:
        console.print(f"[red]cannot evaluate[/red]: {escape(str(exc))}")
        raise typer.Exit(2) from None
    print(result["table"])  # plain print: a markdown table must not be re-wrapped
    console.print(f"Report: {ctx.layout.reports / 'eval.md'}. Browse runs: `moa ui`, then the links it prints.")


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
    source: Annotated[str, typer.Option("--source", "-s", help="a local .jsonl/.json/.parquet/.csv file, builtin:NAME\\[/CATEGORY] (e.g. builtin:bbc/tech), or a dataset id in the local HF cache")],
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

    ctx = _ctx(params, profile)  # params.yaml itself must be valid first
    fields = _field_map(field)
    from tasks.onboard import plan_onboarding

    try:  # the request is checked here too, before the flow run (and its Prefect server) starts
        plan_onboarding(params, domain, source, fields or None, description, profile)
        from flows.onboard import onboard_domain

        with _stoppable(ctx, f"moa onboard -d {domain} -s {source}"):
            result = onboard_domain(domain=domain, source=source, fields=fields or None, description=description,
                                    params=str(params.resolve()), profile=profile)
    except (OnboardError, ConfigError, SourceError, EmptyDomainError) as exc:
        console.print(f"[red]onboarding {domain!r} stopped before training[/red]: {escape(str(exc))}\n"
                      "params.yaml and the model registry are unchanged.")
        raise typer.Exit(2) from None
    ev, reg, cost = result["evaluation"], result["registered"], result["cost"]
    t = Table(title=f"onboard {domain}: {ev['metric']} per domain, before -> after (test split)")
    for col in ("domain", "before", "after", "router acc"):
        t.add_column(col)
    acc = ev["router_accuracy_by_domain"]
    acc_before = ev.get("router_accuracy_by_domain_before", {})
    for d, vals in ev["after"].items():
        before = ev["before"].get(d, {}).get(ev["metric"])
        shown = f"{before:.3f}" if before is not None else f"{ev['base_new_domain'][ev['metric']]:.3f} (base model)"
        router = (f"{acc_before[d]:.0%} -> " if d in acc_before else "") + (f"{acc[d]:.0%}" if d in acc else "-")
        t.add_row(d, shown, f"{vals[ev['metric']]:.3f}", router)
    console.print(t)
    console.print(
        f"cost, training time against training time (evaluation excluded on both sides): onboarding trained "
        f"{cost['onboard_train_seconds']} s (new expert {cost['onboard_expert_train_seconds']} s + update "
        f"{cost['onboard_router_train_seconds']} s) and {cost['onboard_trainable_params']:,} parameters; "
        f"the last full pipeline trained the old domains' experts and router for "
        f"{cost['pipeline_train_seconds_old_domains']} s, and the whole mixture has "
        f"{cost['full_mixture_trainable_params']:,} parameters.\n"
        + (f"[green]promoted[/green]: {reg['model']} v{reg['version']} is @champion and params.yaml lists {domain!r}; "
           "`dvc repro` and scheduled retrains include it from now on."
           if reg["promoted"] else
           f"[yellow]not promoted[/yellow]: {reg['model']} v{reg['version']} registered, {escape(ev['reason'])}. "
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


@stage_app.callback()
def _stage_logging() -> None:
    """A stage run alone (DVC's `moa stage ...`) prints its progress: training steps, evaluated domains. Inside a
    Prefect run the same lines go to the run's logger; here the `moa` logger gets a stderr handler."""
    import logging

    log = logging.getLogger("moa")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


@stage_app.command("curate")
def stage_curate(domain: str, params: Params = Path("params.yaml")) -> None:
    """Curate one domain -> data/curated/<domain>/."""
    from tasks.curate import run_curate

    console.print_json(json.dumps(run_curate(_stage_ctx(params, f"curate {domain}"), domain)))


def _train_ctx(params: Path, stage: str, nproc: int, side_by_side: bool = False):
    """side_by_side: the stage runs beside its peers (one expert per domain), so it takes its share of the
    cores (train.parallel_jobs); torchrun ranks also split them."""
    from moa_core.ranks import launched_by_torchrun
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
    """The method's mixture (MoA stage 2 / MoSLD / MoDULA) -> models/mixture/<method>/, then, as the flow does,
    the routing-loss ablation and evaluate.compare_methods where params.yaml asks for them."""
    from moa_core.methods import planned_mixtures
    from tasks.train_router import run_train_router

    ctx = _train_ctx(params, "train-router", nproc_per_node)
    for mix in planned_mixtures(ctx.cfg):
        _print_result(run_train_router(ctx, method=mix.method, eta=mix.eta, name=mix.name))


@stage_app.command("evaluate")
def stage_evaluate(params: Params = Path("params.yaml")) -> None:
    """Evaluate every system on the test split -> metrics/eval.json, reports/eval.md (`moa evaluate`, as DVC runs it)."""
    _evaluate(params, None, "evaluate")


@stage_app.command("intervals")
def stage_intervals(params: Params = Path("params.yaml")) -> None:
    """95 % bootstrap intervals over the test rows (every seed of train.seeds) -> metrics/eval_intervals.json,
    reports/eval_intervals.md."""
    from tasks.evaluate import run_intervals

    result = run_intervals(_stage_ctx(params, "intervals"))
    print(result["table"])  # plain print: a markdown table must not be re-wrapped


@stage_app.command("register")
def stage_register(params: Params = Path("params.yaml")) -> None:
    """Register the mixture in the MLflow Model Registry; move @champion only if not worse."""
    from tasks.register import run_register

    console.print_json(json.dumps(run_register(_stage_ctx(params, "register"))))


def _port_taken(host: str, port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no holder
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def mlflow_links(ctx, base: str) -> dict[str, str]:
    """Direct links into the MLflow 3 UI, which otherwise opens on its GenAI view (traces) and hides the runs and
    the registry until one switches to "Model training": the runs list and the registered model."""
    import mlflow

    from tasks.common import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(ctx))
    exp = mlflow.get_experiment_by_name(ctx.cfg.tracking.experiment)
    runs = (f"{base}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning" if exp is not None
            else f"{base}/#/experiments?workflowType=machine_learning")
    return {"runs": runs, "model": f"{base}/#/models/{ctx.cfg.registry.model_name}"}


@app.command()
def ui(params: Params = Path("params.yaml"), port: int = 5000, host: str = "127.0.0.1",
       prefect: Annotated[bool, typer.Option(help="also start the Prefect UI (server) on --prefect-port")] = False,
       prefect_port: int = 4200) -> None:
    """Start the MLflow UI (and optionally the Prefect UI) on loopback; Ctrl-C or SIGTERM stops both."""
    import signal

    from tasks.common import tracking_uri

    ctx = _ctx(params)
    wanted = [("MLflow UI", port, "--port")] + ([("Prefect UI", prefect_port, "--prefect-port")] if prefect else [])
    taken = [(what, p, opt) for what, p, opt in wanted if _port_taken(host, p)]
    if taken:
        for what, p, opt in taken:
            console.print(f"[red]port {p} on {host} is taken[/red]: the {what} cannot start there. Another `moa ui` "
                          f"(or another server) holds it: stop that one, or pick a free port with {opt} N.")
        raise typer.Exit(2)
    cmds = [("MLflow UI", [sys.executable, "-m", "mlflow", "ui", "--host", host, "--port", str(port), "--workers", "1",
                           "--backend-store-uri", tracking_uri(ctx)],
             {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})]
    if prefect:
        # `--port` alone leaves the UI calling the API on PREFECT_SERVER_API_PORT (4200) or $PREFECT_API_URL
        cmds.append(("Prefect UI", [sys.executable, "-m", "prefect", "server", "start", "--host", host,
                                    "--port", str(prefect_port)],
                     {**os.environ, "PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(prefect_port),
                      "PREFECT_UI_API_URL": f"http://{host}:{prefect_port}/api"}))
    links = mlflow_links(ctx, f"http://{host}:{port}")
    stop = {"signal": None}

    def on_signal(signum: int, _frame: object) -> None:
        stop["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    # each server in its own process group: stopping it stops its workers too, and a terminal's Ctrl-C reaches
    # only this process, which stops them in order
    procs = [(name, subprocess.Popen(cmd, env=env, start_new_session=True)) for name, cmd, env in cmds]
    console.print(f"MLflow UI: http://{host}:{port}\n  runs: {links['runs']}\n  registered model: {links['model']}",
                  soft_wrap=True)
    if prefect:
        console.print(f"Prefect UI: http://{host}:{prefect_port}")
    console.print("Ctrl-C (or SIGTERM) stops the servers.")
    failed = None
    try:
        while stop["signal"] is None and failed is None:
            failed = next(((n, p) for n, p in procs if p.poll() is not None), None)
            if failed is None:
                import time

                time.sleep(0.2)
    finally:
        for _name, p in procs:
            _stop_group(p)
        for s, h in previous.items():
            signal.signal(s, h)
    if failed is not None:
        name, p = failed
        console.print(f"[red]{name} exited with {p.returncode}[/red]; the other servers were stopped. Its output is "
                      "above; a port taken meanwhile or a broken store are the usual causes.")
        raise typer.Exit(1)
    console.print(f"stopped ({signal.Signals(stop['signal']).name}): the servers are down.")


def _stop_group(p: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to a server's process group, SIGKILL after `grace` seconds."""
    import signal

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):  # workers that outlived their leader
        os.killpg(p.pid, signal.SIGKILL)


from moa_cli import deploy_cmd  # noqa: E402  `moa deploy`

deploy_cmd.register(app)
from moa_cli import generate_cmd  # noqa: E402  `moa generate`

generate_cmd.register(app)

if __name__ == "__main__":
    app()
