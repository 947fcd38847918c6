"""What the CLI prints: every --help renders (rich markup in help texts must be escaped), and error messages
that contain brackets (regex patterns, lists) print them instead of losing them to markup."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
import typer
import yaml
from typer.testing import CliRunner

from conftest import tiny_raw_params
from moa_cli.main import app


def _commands(group: click.Command, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [path]
    for name, cmd in getattr(group, "commands", {}).items():
        out += _commands(cmd, (*path, name))
    return out


@pytest.mark.parametrize("path", _commands(typer.main.get_command(app)), ids=lambda p: " ".join(p) or "moa")
def test_every_help_renders(path: tuple[str, ...]):
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, f"moa {' '.join(path)} --help: {result.output}{result.exception!r}"
    assert "Usage" in result.output


def test_onboard_help_shows_the_builtin_syntax():
    result = CliRunner().invoke(app, ["onboard", "--help"], terminal_width=200)
    assert result.exit_code == 0, repr(result.exception)
    assert "builtin:NAME[/CATEGORY]" in result.output, result.output


def test_a_bad_domain_name_prints_the_whole_pattern(tmp_path: Path, tiny_model_dir: Path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_raw_params(tiny_model_dir), sort_keys=False))
    result = CliRunner().invoke(app, ["onboard", "-d", "Law!", "-s", "builtin:bbc/tech",
                                      "--params", str(tmp_path / "params.yaml")], terminal_width=250)
    assert result.exit_code == 2, result.output
    assert "^[a-z][a-z0-9_]{0,31}$" in result.output, result.output
    assert "params.yaml and the model registry are unchanged" in result.output


def test_moa_ui_links_the_experiments_before_the_first_run_then_the_experiments_runs(tmp_path: Path, tiny_model_dir):
    """The MLflow links `moa ui` prints: on a project with no run yet the experiments list, once the experiment
    exists its runs (tests/test_ui_browser.py reads them in the log of a real `moa ui`)."""
    import mlflow

    from moa_cli.main import mlflow_links
    from tasks.common import StageContext
    from tasks.tracking import mlflow_experiment

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_raw_params(tiny_model_dir)))
    ctx = StageContext.load(tmp_path / "params.yaml")
    before = mlflow.get_tracking_uri()
    try:
        base = "http://127.0.0.1:5000"
        assert mlflow_links(ctx, base) == {"runs": f"{base}/#/experiments?workflowType=machine_learning",
                                           "model": f"{base}/#/models/moa-model"}
        exp = mlflow_experiment(ctx)
        assert mlflow_links(ctx, base)["runs"] == f"{base}/#/experiments/{exp}/runs?workflowType=machine_learning"
    finally:
        mlflow.set_tracking_uri(before)  # the tracking URI is process-wide
