"""The web console in a real headless browser: Debian's chromium, driven
through selenium and chromium-driver, against a real daemon.

It opens the overview, follows a posting from the list, pauses and resumes
it through the confirmation pages, watches the live progress reach the
end, and takes screenshots into the test's temporary directory (and into
$PDOFLOWD_WEB_SCREENSHOTS too, when set: how docs/web/*.png are made).
Skipped, saying why, only when /usr/bin/chromium is missing.
"""

from __future__ import annotations

import base64
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.devcluster import free_port
from devtools.webproc import WebProcess
from harness import Daemon, create_effects_table, daemon_config
from pdoflowd.client import Client

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ADMIN = ("ada", "ada-secret")
WINDOW = (1100, 820)

# A browser and a console take 15 to 20 s here: make test-slow (and CI)
# runs this, make test leaves it out.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="CHROMIUM MISSING: the browser test needs Debian's chromium"
        " and chromium-driver (apt-get install chromium chromium-driver)",
    ),
]


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("browser")


@pytest.fixture(scope="module")
def module_dsn(pg_server: Any, pdoflowd_template: str) -> Iterator[str]:
    name = f"t_browser_{uuid.uuid4().hex[:10]}"
    dsn = pg_server.create_database(name, template=pdoflowd_template)
    create_effects_table(dsn)
    try:
        yield dsn
    finally:
        pg_server.drop_database(name)


@pytest.fixture(scope="module")
def daemon(module_dsn: str, tmp_module: Path) -> Iterator[Daemon]:
    running = Daemon(
        tmp_module, daemon_config(module_dsn), effects_dsn=module_dsn
    )
    running.start().wait_ready()
    try:
        yield running
    finally:
        running.close()


@pytest.fixture(scope="module")
def web(module_dsn: str, tmp_module: Path) -> Iterator[WebProcess]:
    from test_web import add_user

    sections = {
        "database": {"dsn": module_dsn},
        "web": {
            "listen": f"127.0.0.1:{free_port()}",
            "users_file": str(tmp_module / "users"),
            "allow_actions": True,
            "refresh_s": 0.5,
        },
    }
    console = WebProcess(tmp_module, sections)
    add_user(console.config_path, *ADMIN, admin=True)
    console.start()
    try:
        yield console
    finally:
        console.stop()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(
        options=options, service=Service(executable_path=str(CHROMEDRIVER))
    )
    try:
        token = base64.b64encode(":".join(ADMIN).encode()).decode()
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd(
            "Network.setExtraHTTPHeaders",
            {"headers": {"Authorization": f"Basic {token}"}},
        )
        driver.set_page_load_timeout(20)
        yield driver
    finally:
        driver.quit()


def shot(driver: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 1000
    published = os.environ.get("PDOFLOWD_WEB_SCREENSHOTS")
    if published:
        Path(published).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(published) / path.name)
    return path


def wait_for(condition: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.1)


def test_overview_to_a_posting_pause_resume_and_live_progress(
    browser: Any,
    web: WebProcess,
    daemon: Daemon,
    module_dsn: str,
    tmp_path: Path,
) -> None:
    from selenium.webdriver.common.by import By

    client = Client(module_dsn)
    warmup = client.post("jobfns.noop", [[i] for i in range(30)], tries=1)
    errors = client.post(
        "jobfns.fail",
        [["disk full"]] * 3 + [["timeout talking to the printer"]] * 2,
        tries=1,
    )
    client.wait(warmup.id, timeout=60)
    client.wait(errors.id, timeout=60)
    posting = client.post("jobfns.sleep", [[0.25]] * 40, tries=1)

    browser.get(web.url + "/")
    assert browser.title.startswith("Overview")
    daemons = browser.find_element(By.ID, "daemons").text
    assert str(daemon.pid) in daemons
    shot(browser, tmp_path, "overview")

    browser.find_element(By.LINK_TEXT, "Postings").click()
    wait_for(lambda: browser.title.startswith("Postings"))
    shot(browser, tmp_path, "postings")
    browser.find_element(
        By.CSS_SELECTOR, f'a[href="/postings/{posting.id}"]'
    ).click()
    wait_for(lambda: str(posting.id) in browser.title)

    browser.find_element(By.ID, "action-pause").click()
    wait_for(lambda: browser.title.startswith("Pause posting"))
    shot(browser, tmp_path, "confirm")
    browser.find_element(By.ID, "confirm").click()
    wait_for(lambda: browser.find_elements(By.ID, "did"))
    assert browser.find_element(By.ID, "did").text == "Posting paused."
    assert browser.find_element(By.ID, "status").text == "paused"
    assert client.status(posting.id).status.value == "paused"
    shot(browser, tmp_path, "posting")

    browser.find_element(By.ID, "action-resume").click()
    wait_for(lambda: browser.title.startswith("Resume posting"))
    browser.find_element(By.ID, "confirm").click()
    wait_for(
        lambda: browser.find_element(By.ID, "did").text == "Posting resumed."
    )
    # The page is not loaded again: the events bring the end.
    wait_for(
        lambda: browser.find_element(By.ID, "status").text == "finished",
        timeout=40,
    )
    assert client.status(posting.id).status.value == "finished"

    failed_job = client.jobs(errors.id)[0].uuid
    browser.get(f"{web.url}/postings/{errors.id}")
    failures = browser.find_element(By.ID, "failures").text
    assert "disk full 3" in failures
    browser.get(f"{web.url}/jobs/{failed_job}")
    assert "RuntimeError" in browser.find_element(By.ID, "error").text
    shot(browser, tmp_path, "job")
    log = web.log()
    assert f"user ada from 127.0.0.1: pause posting {posting.id}" in log
    assert f"user ada from 127.0.0.1: resume posting {posting.id}" in log
