"""The management page in a real browser: headless Chromium (Debian's
chromium and chromium-driver, driven by selenium) against a whole node
(`twistd -n ooidx` on memory://) and a real DAP upstream (pydap's server).

The operator enters the token, registers a dataset against the upstream,
sees it listed; a DAP request goes through the proxy; the page shows the
statistics and the dataset's hits move without a reload; the operator purges
the dataset. Screenshots go to the test's tmp directory, and the last one is
copied to /tmp/ooidx-page.png to look at.

A machine without Chromium fails this test with what to install; it does not
skip (scripts/test installs chromium and chromium-driver as root on Debian).
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from webpage_node import Node, http_get, run_node, upstream_in

CHROMIUM = os.environ.get("OOIDX_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("OOIDX_CHROMEDRIVER", "/usr/bin/chromedriver")
SCREENSHOT_COPY = Path("/tmp/ooidx-page.png")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1440,1000", "--lang=en-US"]

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: Any) -> Any:
    with upstream_in(tmp_path_factory.mktemp("dap-data")) as up:
        yield up


@pytest.fixture(scope="module")
def node(tmp_path_factory: Any, upstream: Any) -> Iterator[Node]:
    # every component; the controller looks for out-of-date datasets twice a second (default: every minute)
    from ooidx.config.model import COMPONENTS
    components = {name: None for name in COMPONENTS}
    components["controller"] = {"freshness_interval": 0.5}
    yield from run_node(tmp_path_factory.mktemp("page-node"), upstream.port, components=components)


def start_chromium() -> Any:
    """A selenium driver for headless Chromium; a clear failure if there is none."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    if missing:
        pytest.fail(f"the browser test needs {' and '.join(missing)}: install Debian's chromium and "
                    "chromium-driver (apt-get install -y chromium chromium-driver; scripts/test does this as "
                    "root on Debian)", pytrace=False)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        pytest.fail(f"the browser test needs selenium ({e}): pip install -e '.[test]'", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="ooidx-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    except Exception as e:  # noqa: BLE001 - any reason Chromium did not start is the failure
        shutil.rmtree(profile, ignore_errors=True)
        pytest.fail(f"headless Chromium did not start ({CHROMIUM}, {CHROMEDRIVER}): {type(e).__name__}: {e}",
                    pytrace=False)
    driver.profile_dir = profile
    return driver


@pytest.fixture
def browser() -> Iterator[Any]:
    driver = start_chromium()
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(driver.profile_dir, ignore_errors=True)


def wait_for(check: Callable[[], Any], what: str, timeout: float = 20.0, on_fail: Callable[[], str] = str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
            last = value
        except Exception as e:  # noqa: BLE001 - the element may be re-rendered under us
            last = e
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})\n{on_fail()}")


def screenshot(driver: Any, directory: Path, name: str) -> Path:
    """A full-page screenshot (the window grown to the page's height)."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1440, max(1000, min(int(height) + 40, 4000)))
    driver.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.4)  # the charts redraw to the new size
    path = directory / f"{name}.png"
    driver.save_screenshot(str(path))
    driver.set_window_size(1440, 1000)
    return path


def test_register_watch_and_purge_in_the_browser(browser: Any, node: Node, upstream: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    d = browser
    find = d.find_element
    text_of = lambda element_id: find(By.ID, element_id).text  # noqa: E731

    def shown(element_id: str) -> bool:
        return find(By.ID, element_id).is_displayed()

    def row(name: str) -> Any:
        rows = d.find_elements(By.CSS_SELECTOR, f'#datasets-table tbody tr[data-name="{name}"]')
        return rows[0] if rows else None

    def cell(name: str, index: int) -> str:
        r = row(name)
        return r.find_elements(By.CSS_SELECTOR, "td")[index].text if r is not None else ""

    d.get(node.web + "/")
    assert d.title.startswith("ooidx")
    # the page comes alive: statistics read, the datasets table empty
    wait_for(lambda: text_of("live-text").startswith("Live"), "the page says it is live", on_fail=node.describe)
    wait_for(lambda: text_of("t-requests") == "0", "the requests tile shows 0")
    wait_for(lambda: shown("datasets-empty"), "the empty datasets table says so")

    # a change without a token is refused in words, before anything is sent
    find(By.ID, "reg-name").send_keys("sst")
    find(By.ID, "reg-url").send_keys(upstream.url("sst.nc"))
    find(By.ID, "register").click()
    wait_for(lambda: "Enter the operator token first" in text_of("error"), "no-token refusal shown")

    # a wrong token: the server's message, in words
    find(By.ID, "token").send_keys("not-the-token-at-all")
    find(By.CSS_SELECTOR, "#token-form button[type=submit]").click()
    find(By.ID, "register").click()
    wait_for(lambda: "the operator token is not valid" in text_of("error"), "wrong token refusal shown")

    # the right token; then a name the server refuses
    find(By.ID, "token-forget").click()
    find(By.ID, "token").send_keys(node.token)
    find(By.CSS_SELECTOR, "#token-form button[type=submit]").click()
    wait_for(lambda: "Token in use" in text_of("token-state"), "token in use")
    name_field = find(By.ID, "reg-name")
    name_field.clear()
    name_field.send_keys("bad name!")
    find(By.ID, "register").click()
    wait_for(lambda: "is not a dataset name" in text_of("register-error"), "bad name refused in words")
    assert name_field.get_attribute("aria-invalid") == "true"

    # register for real
    name_field.clear()
    name_field.send_keys("sst")
    find(By.ID, "register").click()
    wait_for(lambda: "Registered sst" in text_of("ok"), "registration confirmed", on_fail=node.describe)
    wait_for(lambda: row("sst") is not None, "sst listed")
    assert cell("sst", 0) == upstream.url("sst.nc")
    assert cell("sst", 1) == "registered"
    assert find(By.ID, "reg-name").get_attribute("value") == ""  # the form is cleared

    # DAP requests through the proxy, by name: a miss, then a hit
    before = d.execute_script("return window.ooidx.series.requests.length")
    direct = http_get(upstream.url("sst.nc.dds"))
    first = http_get(node.proxy + "/datasets/sst.dds")
    assert first[0] == 200 and first[2] == direct[2], (first, node.describe())
    wait_for(lambda: http_get(node.proxy + "/datasets/sst.dds")[1].get("X-Ooidx-Source") == "cache",
             "a second request served by the cache", on_fail=node.describe)

    # the page moves without a reload: tiles, the dataset's hits, the charts
    wait_for(lambda: int(text_of("t-requests").replace(",", "")) >= 2, "requests tile moved", on_fail=node.describe)
    wait_for(lambda: int(text_of("t-hits").replace(",", "")) >= 1, "hits tile moved")
    wait_for(lambda: int(cell("sst", 5) or 0) >= 1, "sst's hits in the table")
    wait_for(lambda: int(cell("sst", 6) or 0) >= 1, "sst's misses in the table")
    bars = wait_for(lambda: [t.text for t in d.find_elements(By.CSS_SELECTOR, "#chart-hits svg text.label")],
                    "the hits-per-dataset chart has a bar")
    assert "sst" in bars
    wait_for(lambda: d.execute_script(
        "return window.ooidx.series.requests.some((p) => p.v > 0)"), "the requests chart saw the requests")
    assert d.execute_script("return window.ooidx.series.requests.length") > before
    assert d.find_elements(By.CSS_SELECTOR, "#chart-requests svg path.line")
    # sizes as the CLI prints them (binary units), and a rate axis of under a
    # byte a second keeps its digit (it read "1 B/s, 1 B/s, 0 B/s")
    sizes = d.execute_script("return [0, 0.5, 1, 1536, 5 * 1024 * 1024, 3 * 2 ** 30].map(window.ooidx.bytes)")
    assert sizes == ["0 B", "0.5 B", "1 B", "1.5 KiB", "5.0 MiB", "3.0 GiB"], sizes
    axis = [t.text for t in d.find_elements(By.CSS_SELECTOR, "#chart-bytes svg text.axis")]
    assert len(set(a for a in axis if a)) == len([a for a in axis if a]), axis  # no two ticks read the same

    # subscriptions and events: a table, or a clear "not available on this node"
    for table, note in (("pubsub-table", "pubsub-unavailable"), ("people-table", "people-unavailable")):
        wait_for(lambda: shown(table) or shown(note) or shown(table.split("-")[0] + "-empty"),
                 f"{table} or its note shown")
        if shown(note):
            assert "not available on this node" in text_of(note) or "token" in text_of(note), text_of(note)
    wait_for(lambda: shown("events-unavailable") or d.find_elements(By.CSS_SELECTOR, "#events-list li")
             or shown("events-empty"), "events or their note shown")
    if shown("events-unavailable"):
        assert "not available on this node" in text_of("events-unavailable")

    shot = screenshot(d, tmp_path, "1-registered-and-requested")
    shutil.copyfile(shot, SCREENSHOT_COPY)

    # refresh now: the fetcher is asked for the dataset
    find(By.CSS_SELECTOR, 'button[aria-label="Refresh sst now"]').click()
    wait_for(lambda: "fresh copy of sst" in text_of("ok"), "refresh confirmed", on_fail=node.describe)

    # the whole dataset fetched, the persister saves a version: the table
    # counts it, and "Versions" lists it with what changed (the first version's
    # summary), in text nodes only
    wait_for(lambda: int(cell("sst", 3) or 0) >= 1, "sst's saved version counted in the table",
             timeout=60, on_fail=node.describe)
    find(By.CSS_SELECTOR, 'button[aria-label="Versions of sst"]').click()
    items = wait_for(lambda: d.find_elements(By.CSS_SELECTOR, "#versions-list li"), "sst's versions listed",
                     on_fail=node.describe)
    assert shown("versions") and text_of("versions-title").lower() == "versions of sst"  # h3 in capitals
    status, answer = node.api("GET", "/api/datasets/sst/versions", token=node.token)
    assert status == 200 and answer["versions"], answer
    newest = answer["versions"][-1]
    first = items[0]
    assert first.get_attribute("data-version") == newest["version"]
    assert first.find_element(By.CSS_SELECTOR, ".version").text == newest["version"]
    assert first.find_element(By.CSS_SELECTOR, ".changes").text == newest["changes"]["text"]
    assert newest["changes"]["text"].startswith("first version"), newest["changes"]
    assert first.find_element(By.CSS_SELECTOR, ".when").text not in ("", "–")
    assert first.find_element(By.CSS_SELECTOR, ".size").text.endswith("B")
    assert not shown("versions-note")
    # the saved event in the recent events says the same words (not the summary's JSON)
    saved = wait_for(lambda: [li.text for li in d.find_elements(By.CSS_SELECTOR, "#events-list li")
                              if f"changes: {newest['changes']['text']}" in li.text],
                     "the saved event's change summary in words", timeout=30, on_fail=node.describe)
    assert '"sha256"' not in saved[0], saved[0]
    screenshot(d, tmp_path, "1b-versions")
    find(By.ID, "versions-close").click()
    wait_for(lambda: not shown("versions"), "the versions closed")

    # a dataset that should update every second and has no new version for
    # 1.5 s is flagged out of date: the badge next to its status
    status, late = node.api("POST", "/api/datasets", {"name": "late", "url": upstream.url("sst.nc"), "expect_every": 1},
                            token=node.token)
    assert status == 201, late
    assert wait_for(lambda: row("late") is not None, "late listed")
    wait_for(lambda: "out of date" in [b.text for b in row("late").find_elements(By.CSS_SELECTOR, ".badge.stale")],
             "late's out-of-date badge", timeout=30, on_fail=node.describe)
    assert not row("sst").find_elements(By.CSS_SELECTOR, ".badge.stale")  # sst declared no period
    status, _ = node.api("DELETE", "/api/datasets/late", token=node.token)
    assert status == 200
    wait_for(lambda: row("late") is None, "late purged")

    # purge, through the confirmation dialog
    find(By.CSS_SELECTOR, 'button[aria-label="Purge sst"]').click()
    dialog = wait_for(lambda: find(By.ID, "confirm").is_displayed() and find(By.ID, "confirm"), "purge dialog open")
    assert "Purge sst?" in dialog.text
    find(By.ID, "confirm-purge").click()
    wait_for(lambda: "sst purged" in text_of("ok"), "purge confirmed", on_fail=node.describe)
    wait_for(lambda: row("sst") is None, "sst gone from the table")
    find(By.ID, "show-purged").click()
    wait_for(lambda: cell("sst", 1) == "purged", "sst shown as purged")
    assert http_get(node.proxy + "/datasets/sst.dds")[0] == 404

    screenshot(d, tmp_path, "2-purged")
    # nothing went wrong in the page's own code (refused requests show as failed loads, which is fine)
    problems = [entry for entry in d.get_log("browser")
                if entry.get("level") == "SEVERE" and "Failed to load resource" not in entry.get("message", "")]
    assert not problems, problems


def test_an_eventsource_opens_a_persons_stream_with_a_ticket(browser: Any, node: Node, upstream: Any) -> None:
    """What a person's page does: trade the token for a stream ticket, open an
    EventSource (which cannot send an Authorization header) on its url."""
    status, person = node.api("POST", "/api/people", {"name": "browser"}, token=node.token)
    assert status == 201, person
    status, sub = node.api("POST", "/api/subscriptions", {"kind": "events", "regex": r"^event\.registered\.tix$"},
                           token=person["token"])
    assert status == 201, sub
    d = browser
    d.get(node.web + "/")  # the same origin as the API
    d.execute_script("""
        const [id, token] = arguments;
        window.got = []; window.opened = false; window.failed = "";
        fetch(`/api/subscriptions/${id}/ticket`, {method: "POST", headers: {Authorization: `Bearer ${token}`}})
          .then((r) => r.json())
          .then((t) => {
            window.ticket = t.ticket;
            const source = new EventSource(t.url);
            window.source = source;
            source.onopen = () => { window.opened = true; };
            source.onmessage = (e) => { window.got.push({id: e.lastEventId, data: JSON.parse(e.data)}); };
          })
          .catch((e) => { window.failed = String(e); });
    """, sub["id"], person["token"])
    wait_for(lambda: d.execute_script("return window.opened || window.failed"), "the EventSource open",
             on_fail=node.describe)
    assert d.execute_script("return window.failed") == ""
    status, _ = node.api("POST", "/api/datasets", {"name": "tix", "url": upstream.url("sst.nc")}, token=node.token)
    assert status == 201
    got = wait_for(lambda: d.execute_script("return window.got.length ? window.got : null"), "the event in the page",
                   on_fail=node.describe)
    assert got[0]["data"]["topic"] == "event.registered.tix" and got[0]["id"]
    ticket = d.execute_script("window.source.close(); return window.ticket")
    node.api("DELETE", "/api/datasets/tix", token=node.token)
    assert ticket and ticket not in node.daemon.log() and ticket.rsplit(".", 1)[1] not in node.daemon.log()


def test_chromium_missing_is_a_failure_not_a_skip(monkeypatch: Any) -> None:
    """The browser test must not pass quietly on a machine without a browser."""
    import _pytest.outcomes

    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", "/nonexistent/chromium")
    with pytest.raises(_pytest.outcomes.Failed, match="install Debian's chromium"):
        start_chromium()
