"""The JupyterLab Dask sidebar, end to end, in a real browser (headless Chromium).

What a user does: "+ NEW" in the Dask sidebar makes a ``LocalVMCluster`` in the Jupyter
server (with no worker); SCALE on its card to 3 shows 3 workers that split the machine;
the card's "inject client code" button writes ``Client("tls://...")`` into a notebook;
running it in the notebook's kernel (another process) connects by address through the
security loader, and ``client.submit(sum, [1, 2])`` computes; a dashboard pane renders
a plot; SHUTDOWN on the card leaves no VM process. A screenshot is kept in the test's
directory when it fails (``failure.png``). SIGTERM to the server is
``test_jupyterlab.py::test_sigterm_to_jupyter_server_closes_its_clusters``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dask.system import CPU_COUNT
from dask.utils import parse_bytes
from distributed.system import MEMORY_LIMIT
from helpers import vm_processes
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from test_jupyterlab import JupyterServer, local_factory
from test_vmrunner import zombie_children

from dask_secure_cloud.providers.local import machine_share

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:  # pragma: no cover - ci/test.sh installs them
    pytest.skip("needs Debian's chromium and chromium-driver", allow_module_level=True)

#: Flags that work in a container as root, and keep Chromium to localhost.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,900",
]

#: Workers the cluster is scaled to from its card, as issue 25 did.
WORKERS = 3

NOTEBOOK = {
    "cells": [],
    "metadata": {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
    },
    "nbformat": 4,
    "nbformat_minor": 5,
}


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def _until(what: str, check: Callable[[], Any], timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = check()
        except WebDriverException:
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def _one(driver: Any, css: str) -> Any:
    found = [e for e in driver.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()]
    return found[0] if found else None


def _screenshot(driver: Any, tmp_path: Path, name: str) -> None:
    """Keep a screenshot in the test's directory, and where ``DSC_SCREENSHOTS`` says (the
    docs' pictures are taken so: ``DSC_SCREENSHOTS=docs/images``)."""
    # JupyterLab offers news from the internet in a notification: decline it.
    for button in driver.find_elements(By.CSS_SELECTOR, ".jp-toast-button"):
        if button.text.strip() == "No":
            with contextlib.suppress(WebDriverException):
                button.click()
                time.sleep(0.5)
    driver.save_screenshot(str(tmp_path / name))
    if os.environ.get("DSC_SCREENSHOTS"):
        driver.save_screenshot(str(Path(os.environ["DSC_SCREENSHOTS"]) / name))


def _run_cell(driver: Any, code: str | None = None) -> None:
    """Type ``code`` into the notebook's active cell (if given), then Shift+Enter."""
    editor = _until("the active cell", lambda: _one(driver, ".jp-Cell.jp-mod-active .cm-content"))
    editor.click()
    if code is not None:
        editor.send_keys(code)
    editor.send_keys(Keys.SHIFT, Keys.ENTER)


def _outputs(driver: Any) -> list[str]:
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output")]


def _card(driver: Any) -> Any:
    return _one(driver, ".dask-ClusterListingItem")


def _card_stat(driver: Any, label: str) -> str:
    """The value of one of the card's lines, ``Number of Cores: 2`` for ``Number of
    Cores``."""
    for line in _card(driver).find_elements(By.CSS_SELECTOR, ".dask-ClusterListingItem-stats"):
        name, _, value = line.text.partition(":")
        if name.strip() == label:
            return value.strip()
    raise AssertionError(f"no {label!r} on the card: {_card(driver).text}")


def test_sidebar_new_scale_inject_compute_pane_shutdown(tmp_path, vm_dir, browser):
    server = JupyterServer(tmp_path, local_factory(vm_dir), app="jupyterlab")
    cluster_id = None
    started = time.monotonic()
    try:
        server.request("PUT", "/api/contents/dask.ipynb", {"type": "notebook", "content": NOTEBOOK})
        browser.get(f"{server.url}/lab/tree/dask.ipynb?token={server.token}")
        _until("the notebook's kernel", lambda: _one(browser, ".jp-Notebook .jp-Cell .cm-content"))
        _until(
            "an idle kernel",
            lambda: (
                _one(browser, ".jp-Notebook-ExecutionIndicator[data-status='idle']")
                or "Idle" in browser.page_source
            ),
            timeout=120,
        )

        # The Dask sidebar, and its "+ NEW" button.
        tab = _until("the Dask tab", lambda: _one(browser, "li[data-id='dask-dashboard-launcher']"))
        if not _one(browser, ".dask-DaskClusterManager"):
            tab.click()
        new = _until(
            "the NEW button",
            lambda: next(
                (
                    b
                    for b in browser.find_elements(
                        By.CSS_SELECTOR,
                        ".dask-DaskClusterManager button, .dask-DaskClusterManager jp-button",
                    )
                    if "NEW" in (b.text or b.get_attribute("title") or "").upper()
                    and b.is_displayed()
                ),
                None,
            ),
        )
        new.click()
        card = _until("a cluster card", lambda: _card(browser), timeout=180)
        (cluster_id,) = _until(
            "the cluster's VM directory", lambda: [p.name for p in vm_dir.iterdir()]
        )
        assert vm_processes(cluster_id)
        assert "tls://" in card.text

        # The sidebar starts clusters with no worker: SCALE from the card. Each worker
        # gets its share of the machine, as if the cluster had started with them all.
        _card(browser).find_element(By.CSS_SELECTOR, ".dask-ClusterListingItem-scale").click()
        workers = _until(
            "the scaling dialog", lambda: _one(browser, ".jp-Dialog .dask-ScalingInput")
        )
        workers.send_keys(Keys.CONTROL, "a")
        workers.send_keys(str(WORKERS))
        _one(browser, ".jp-Dialog .jp-Dialog-button.jp-mod-accept").click()
        _until(
            f"{WORKERS} workers on the card",
            lambda: _card_stat(browser, "Number of Workers") == str(WORKERS),
            timeout=180,
        )
        share = machine_share({}, WORKERS)
        cores = int(_card_stat(browser, "Number of Cores"))
        memory = parse_bytes(_card_stat(browser, "Memory").replace(" ", ""))
        # One thread at least per worker, as LocalCluster: no more cores than the
        # machine's, unless it has fewer cores than workers.
        assert cores == WORKERS * share["nthreads"] <= max(CPU_COUNT, WORKERS), card.text
        assert memory <= MEMORY_LIMIT * 1.01, card.text  # as the card rounds it

        # Its "inject client code" button writes Client("tls://...") into the notebook.
        _card(browser).find_element(By.CSS_SELECTOR, ".dask-ClusterListingItem-code").click()
        _until(
            "the injected code",
            lambda: any(
                'Client("tls://' in e.text
                for e in browser.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell .cm-content")
            ),
        )
        cells = browser.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell")
        injected = next(c for c in cells if 'Client("tls://' in c.text)
        injected.find_element(By.CSS_SELECTOR, ".cm-content").click()
        _run_cell(browser)
        _until(
            "the client's repr", lambda: any("Client" in t for t in _outputs(browser)), timeout=180
        )
        _run_cell(browser, "client.submit(sum, [1, 2]).result()")
        _until("the result", lambda: any(t.strip() == "3" for t in _outputs(browser)), timeout=180)
        _screenshot(browser, tmp_path, "jupyterlab-sidebar.png")

        # A dashboard pane, through the cluster's dashboard proxy, renders its plot.
        pane = _until(
            "the Task Stream button",
            lambda: next(
                (
                    b
                    for b in browser.find_elements(By.CSS_SELECTOR, ".dask-DashboardListing-item")
                    if b.text.strip().upper() == "TASK STREAM" and b.is_displayed()
                ),
                None,
            ),
        )
        pane.click()
        frame = _until(
            "the pane's frame",
            lambda: _one(browser, ".dask-DaskDashboard-widget iframe"),
        )
        browser.switch_to.frame(frame)
        _until(
            "a plot in the pane",
            lambda: browser.find_elements(By.CSS_SELECTOR, "[data-root-id]"),
            timeout=120,
        )
        browser.switch_to.default_content()
        time.sleep(2)  # let the plot draw before the picture
        _screenshot(browser, tmp_path, "jupyterlab-task-stream.png")

        # SHUTDOWN from the card: the card goes, and every VM with it.
        _card(browser).find_element(By.CSS_SELECTOR, ".dask-ClusterListingItem-stop").click()
        sent = time.monotonic()
        _until("the card to go", lambda: not _card(browser), timeout=60)
        while vm_processes(cluster_id):
            assert time.monotonic() - sent < 60, server.log.read_text()
            time.sleep(0.2)
        print(f"SHUTDOWN to no VM left: {time.monotonic() - sent:.1f}s")
        # No VM's boot shell is left <defunct> under the Jupyter server either.
        _until(
            "no zombie under the Jupyter server",
            lambda: not zombie_children(server.process.pid),
            timeout=5,
        )
    except BaseException:
        with contextlib.suppress(WebDriverException):
            browser.save_screenshot(str(tmp_path / "failure.png"))
        print(f"screenshots and the server's log: {tmp_path}")
        raise
    finally:
        server.close()
    print(f"the whole test: {time.monotonic() - started:.1f}s")
    events = [json.loads(line) for line in server.audit_log.read_text().splitlines()]
    issued = [e for e in events if e["event"] == "local_client_certificate"]
    assert issued and issued[0]["name"].startswith("kernel-"), issued
