"""The MLflow UI in a real browser: `mlflow server` on the SQLite store of a real main run, Debian's headless
Chromium driven by Selenium. .ci/run installs chromium + chromium-driver and sets GRPO_REQUIRE_BROWSER=1, so
there this test runs or fails; elsewhere it skips when no browser is installed."""
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import pytest
from conftest import ROOT, free_port, run_entry, wait_until

SCREENSHOTS = ROOT / "test-artifacts"


def _browser():
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if os.environ.get("GRPO_REQUIRE_BROWSER"):
            raise AssertionError("chromium / chromedriver missing: apt-get install chromium chromium-driver")
        pytest.skip("needs Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1600,1000"):  # no background networking: this machine has no internet
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


@pytest.mark.slow
def test_experiment_page_lists_nested_runs_and_renders_accuracy_chart(store, tiny_model_dir, tmp_path):
    from selenium.webdriver.common.by import By

    driver = _browser()
    tiny = ["--model", tiny_model_dir, "--backend", "hf", "--problems", "2", "--attempts", "2", "--max_new_tokens", "6",
            "--eval_limit", "2", "--val_limit", "2", "--train_batch_size", "4", "--max_iterations", "1"]
    run_entry("main", *tiny)
    run_entry("sweep", *tiny, "--n_trials", "2", "--log_models", "last", "--storage", f"sqlite:///{tmp_path}/o.db")
    client = mlflow.MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (main,) = [r for r in runs if r.data.tags.get("grpo.stage") == "main"]
    (sweep,) = [r for r in runs if r.data.tags.get("grpo.stage") == "sweep"]
    experiment = main.info.experiment_id
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--host",
                               "127.0.0.1", "--port", str(port), "--workers", "1"], stdout=log, stderr=log,
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    SCREENSHOTS.mkdir(exist_ok=True)
    try:
        wait_until(lambda: urllib.request.urlopen(f"{base}/health", timeout=2).status == 200, "mlflow server", 120)
        driver.get(f"{base}/#/experiments/{experiment}/runs?workflowType=machine_learning")
        link = wait_until(lambda: driver.find_element(By.XPATH, "//a[normalize-space()='main']"), "the main run")
        row = link.find_element(By.XPATH, "./ancestor::*[@role='row'][1]")
        row.find_element(By.CSS_SELECTOR, "button[data-component-id*='runnamecellrenderer']").click()  # expand
        expected = {"main", "evaluate-0", "rollout-0", "annotate-0", "finetune-0", "evaluate-1"}
        names = lambda: {e.text for e in driver.find_elements(By.CSS_SELECTOR, "a[href*='/runs/']")}  # noqa: E731
        wait_until(lambda: expected <= names(), f"nested stage runs {expected}")
        driver.save_screenshot(str(SCREENSHOTS / "mlflow_ui_runs.png"))

        driver.get(f"{base}/#/experiments/{experiment}/runs/{main.info.run_id}/model-metrics")

        def accuracy_line():
            """The drawn line (an SVG path with points) inside the chart card titled test_accuracy."""
            title = driver.find_element(By.XPATH, "//*[normalize-space(text())='test_accuracy']")
            card = title.find_element(By.XPATH, "./ancestor::*[.//*[contains(@class,'js-plotly-plot')]][1]")
            paths = card.find_elements(By.CSS_SELECTOR, ".js-plotly-plot path.js-line")
            return paths and paths[0].get_attribute("d")

        wait_until(accuracy_line, "the plotted test_accuracy chart", 120)
        driver.save_screenshot(str(SCREENSHOTS / "mlflow_ui_test_accuracy.png"))

        # the sweep: its overlay of every trial's curves, and the trials' policies as logged models
        driver.get(f"{base}/#/experiments/{experiment}/runs/{sweep.info.run_id}/artifacts")
        wait_until(lambda: driver.find_element(By.XPATH, "//*[normalize-space(text())='sweep_curves.png']"),
                   "the sweep figure in the artifact list").click()
        drawn = lambda: [i for i in driver.find_elements(By.TAG_NAME, "img")  # noqa: E731
                         if (i.get_attribute("naturalWidth") or "0").isdigit() and int(i.get_attribute("naturalWidth"))
                         > 400]
        wait_until(drawn, "the sweep figure drawn", 60)
        driver.save_screenshot(str(SCREENSHOTS / "mlflow_ui_sweep_curves.png"))
        driver.get(f"{base}/#/experiments/{experiment}/models")
        policies = lambda: {e.text for e in driver.find_elements(By.XPATH, "//a[starts-with(text(), 'policy-')]")}  # noqa
        wait_until(lambda: "policy-0001" in policies(), "the logged policies in the Models tab", 120)
        driver.save_screenshot(str(SCREENSHOTS / "mlflow_ui_models.png"))
    finally:
        driver.quit()
        os.killpg(server.pid, signal.SIGTERM)  # the server we started, and its workers
        server.wait(timeout=30)
        log.close()
    assert Path(SCREENSHOTS / "mlflow_ui_test_accuracy.png").stat().st_size > 10_000
