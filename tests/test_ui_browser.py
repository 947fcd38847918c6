"""`moa ui --prefect` on the shared e2e pipeline run, looked at in a real headless browser (Debian's chromium +
chromedriver, driven by selenium): the MLflow UI shows the experiment, the pipeline's parent run with its stage
runs and the registered `moa-model` with its @champion alias; the Prefect UI shows the flow run. Both servers
listen on 127.0.0.1 only; `kill` of `moa ui` stops both, and a second `moa ui` on taken ports is refused.
Screenshots go to tests/artifacts/ (git-ignored)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from procs import ROOT, VENV_BIN, Proc, free_port, port_free, wait_http

pytestmark = pytest.mark.slow
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def moa_ui(project: Path, pipeline_result: dict):
    """`moa ui --prefect` on free loopback ports, on the project of the shared pipeline run (and the test
    session's PREFECT_HOME, whose database holds that flow run)."""
    mlflow_port, prefect_port = free_port(), free_port()
    args = ["ui", "--params", str(project / "params.yaml"), "--port", str(mlflow_port), "--prefect",
            "--prefect-port", str(prefect_port)]
    proc = Proc("moa ui", [str(VENV_BIN / "moa"), *args], ARTIFACTS / "moa-ui.log", env=dict(os.environ), cwd=project)
    try:
        wait_http(proc, f"http://127.0.0.1:{mlflow_port}/health", timeout=150)
        wait_http(proc, f"http://127.0.0.1:{prefect_port}/api/health", timeout=150)
        yield {"proc": proc, "args": args, "mlflow_port": mlflow_port, "prefect_port": prefect_port,
               "mlflow": f"http://127.0.0.1:{mlflow_port}", "prefect": f"http://127.0.0.1:{prefect_port}"}
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: the browser tests need Debian's chromium and chromium-driver. "
                    "`make test` installs them (as root); by hand: apt-get install -y chromium chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is missing: pip install -e '.[dev]' (or make install)")
    opts = Options()
    opts.binary_location = str(CHROMIUM)
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000",
              "--no-first-run", "--disable-extensions"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def _page(driver, url: str, must_show: list[str], shot: str, timeout: float = 60) -> str:
    """Open `url`, wait until the rendered page shows every string of `must_show`, save a screenshot."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / shot
    driver.get(url)
    text = ""

    def shows_all(d) -> bool:
        nonlocal text
        text = d.find_element(By.TAG_NAME, "body").text
        return all(s in text for s in must_show)

    try:
        WebDriverWait(driver, timeout, poll_frequency=0.5).until(shows_all)
    except TimeoutException:
        driver.save_screenshot(str(path))
        pytest.fail(f"{url} did not show {[s for s in must_show if s not in text]} within {timeout}s; "
                    f"screenshot {path}; page text:\n{text[:3000]}")
    time.sleep(0.5)  # let late layout settle for the screenshot
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return text


def test_moa_ui_serves_both_uis_on_loopback_only(moa_ui: dict):
    proc: Proc = moa_ui["proc"]
    ports = {moa_ui["mlflow_port"], moa_ui["prefect_port"]}
    listening = proc.listening()
    assert {port for _, port in listening} >= ports, listening
    assert {ip for ip, _ in listening} == {"127.0.0.1"}, f"a server of `moa ui` listens beyond loopback: {listening}"
    # the Prefect UI must call the API of this server (not the default 4200)
    assert httpx.get(f"{moa_ui['prefect']}/ui-settings", timeout=10).json()["api_url"] == f"{moa_ui['prefect']}/api"


def test_mlflow_ui_shows_the_pipeline_run_and_the_registered_model(moa_ui: dict, browser, project: Path,
                                                                     pipeline_result: dict):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns/mlflow.db'}")
    run = client.get_run(pipeline_result["mlflow_run_id"])
    exp, run_id = run.info.experiment_id, run.info.run_id
    version = pipeline_result["registered"]["version"]
    ui = moa_ui["mlflow"]

    _page(browser, f"{ui}/#/experiments", ["Experiments", "moa"], "mlflow-experiments.png")
    _page(browser, f"{ui}/#/experiments/{exp}/runs?workflowType=machine_learning", ["Runs", "pipeline:moa"],
          "mlflow-runs.png")
    text = _page(browser, f"{ui}/#/experiments/{exp}/runs/{run_id}",
                 ["pipeline:moa", "Child runs", "train_router:moa", "evaluate", "register", run_id,
                  pipeline_result["flow_run_id"]], "mlflow-pipeline-run.png")
    assert "Finished" in text
    _page(browser, f"{ui}/#/models", ["Registered Models", "moa-model", "champion"], "mlflow-models.png")
    text = _page(browser, f"{ui}/#/models/moa-model", ["moa-model", f"Version {version}", "champion", "moa.promotion"],
                 "mlflow-moa-model.png")
    assert "code,finance,medicine,sports" in text.replace(" ", "") or "code,medicine,finance,sports" in text


def test_prefect_ui_shows_the_pipeline_flow_run(moa_ui: dict, browser, pipeline_result: dict):
    text = _page(browser, f"{moa_ui['prefect']}/runs/flow-run/{pipeline_result['flow_run_id']}",
                 ["moa_pipeline", "Completed"], "prefect-flow-run.png", timeout=90)
    assert "Can't connect to Server API" not in text


# Last in this module: it stops the module's `moa ui` (which spares this check a `moa ui` start of its own).
def test_moa_ui_stops_its_servers_on_sigterm_and_refuses_taken_ports(moa_ui: dict, project: Path):
    """`kill <pid>` of `moa ui --prefect` stops the MLflow and Prefect servers it started; a second `moa ui` on the
    same ports exits non-zero naming the port instead of exiting 0 with no server."""
    import signal
    import subprocess

    import psutil

    ui: Proc = moa_ui["proc"]
    mlflow_port, prefect_port = moa_ui["mlflow_port"], moa_ui["prefect_port"]
    from mlflow import MlflowClient

    # the links it printed (before any run it links the experiments list: tests/test_cli_messages.py)
    exp = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns/mlflow.db'}").get_experiment_by_name("moa")
    out = ui.tail(1_000_000)
    assert f"http://127.0.0.1:{mlflow_port}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning" in out, out
    assert f"http://127.0.0.1:{mlflow_port}/#/models/moa-model" in out, out

    second = subprocess.run([str(VENV_BIN / "moa"), *moa_ui["args"]], cwd=project, capture_output=True, text=True,
                            timeout=120)
    assert second.returncode != 0, second.stderr
    assert f"port {mlflow_port}" in second.stderr and f"port {prefect_port}" in second.stderr, second.stderr
    assert "--port" in second.stderr, second.stderr

    kids = psutil.Process(ui.p.pid).children(recursive=True)
    assert {mlflow_port, prefect_port} <= {port for _, port in ui.listening()}, ui.listening()
    os.kill(ui.p.pid, signal.SIGTERM)
    assert ui.p.wait(timeout=30) == 0, ui.tail()
    gone, alive = psutil.wait_procs(kids, timeout=15)
    assert not alive, f"servers left behind: {[p.cmdline() for p in alive]}"
    assert port_free(mlflow_port) and port_free(prefect_port)
