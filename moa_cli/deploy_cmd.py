"""`moa deploy`: register prefect.yaml's deployments (nightly retrain on a cron, onboarding on demand) with a
Prefect server, and make sure their process work pool exists.

What it runs is plain Prefect CLI, in the directory of prefect.yaml (that directory becomes the flow runs'
working directory):

    prefect work-pool create moa-process --type process      # once
    prefect --no-prompt deploy --all                          # or --name <deployment> ...
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml
from rich.console import Console
from rich.markup import escape

console = Console(stderr=True)
DEFAULT_API = "http://127.0.0.1:4200/api"


def _prefect(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefect", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, check=False)


def _server_up(api_url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{api_url.rstrip('/')}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _ensure_process_pool(api_url: str, pool: str) -> bool:
    """`prefect work-pool create <pool> --type process` unless it exists; True when created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
            return False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process",
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
            return True


def deploy(
    prefect_file: Annotated[Path, typer.Option("--prefect-file", help="deployments file")] = Path("prefect.yaml"),
    api_url: Annotated[Optional[str], typer.Option(
        "--api-url", help=f"Prefect API; default $PREFECT_API_URL or {DEFAULT_API} (the server of `moa ui --prefect`)")] = None,
    name: Annotated[Optional[list[str]], typer.Option(
        "--name", "-n", help="deploy only these deployments of prefect.yaml (repeatable); default: all")] = None,
) -> None:
    """Register prefect.yaml's deployments (nightly retrain cron, on-demand onboarding) with a Prefect server."""
    prefect_file = prefect_file.resolve()
    if not prefect_file.exists():
        console.print(f"[red]{prefect_file} not found[/red]: run moa deploy in the project checkout or pass --prefect-file")
        raise typer.Exit(2)
    api_url = api_url or os.environ.get("PREFECT_API_URL") or DEFAULT_API
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_CLI_PROMPT": "false", "COLUMNS": "200"}
    root = prefect_file.parent

    config = yaml.safe_load(prefect_file.read_text()) or {}
    deployments = config.get("deployments") or []
    wanted = [d for d in deployments if not name or d.get("name") in name]
    if name and len(wanted) != len(name):
        console.print(f"[red]unknown deployment(s)[/red] {sorted(set(name) - {d.get('name') for d in wanted})}; "
                      f"{prefect_file.name} has {[d.get('name') for d in deployments]}")
        raise typer.Exit(2)
    ready = []
    for d in wanted:  # an entrypoint whose file is missing would stop `prefect deploy` half-way
        path = d.get("entrypoint", "").rsplit(":", 1)[0]
        if (root / path).exists():
            ready.append(d)
        else:
            console.print(f"[yellow]skipping {d.get('name')}[/yellow]: {path} does not exist")
    if not ready:
        console.print("[red]nothing to deploy[/red]")
        raise typer.Exit(1)

    if not _server_up(api_url):
        console.print(f"[red]no Prefect server at {api_url}[/red]: start one with `moa ui --prefect` or "
                      "`prefect server start --host 127.0.0.1 --port 4200`, or pass --api-url")
        raise typer.Exit(1)
    pools = sorted({(d.get("work_pool") or {}).get("name") for d in ready} - {None})
    for pool in pools:
        if _ensure_process_pool(api_url, pool):
            console.print(f"created process work pool [bold]{pool}[/bold]")

    args = ["--no-prompt", "deploy", "--prefect-file", str(prefect_file)]
    for d in ready:
        args += ["--name", d["name"]]
    r = _prefect(args, env, root)
    out = r.stdout + r.stderr
    if r.returncode != 0 or "Skipping deployment configuration" in out:
        console.print(f"[red]prefect deploy failed[/red] (exit {r.returncode}):\n{escape(out)}")
        raise typer.Exit(1)
    console.print(f"deployed {[d['name'] for d in ready]} to {api_url} from {root}")
    workers = "".join(f"  prefect worker start --pool {p}    # executes the deployments' flow runs\n" for p in pools)
    console.print("Next:\n" + workers
                  + "  prefect deployment run 'moa_pipeline/nightly-retrain'    # a run now; the cron runs it nightly\n"
                  "  prefect deployment ls    # or the Prefect UI: /deployments", soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("deploy")(deploy)
