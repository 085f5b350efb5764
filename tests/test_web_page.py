"""The web page in a real headless Chromium against a live server on the demo pair: Compare streams
coloured tokens into every column (legend, hover / focus logprobs, search highlight, copy as curl
that reproduces the sample), an experiment runs and is plotted, a weight-diff job trains and its
adapter is used in Compare, a diffing job's tables, KL summary and high-KL tokens are the API's,
bad input shows the server's message at the field, a dropped connection offers a Retry that works,
and an API key is asked once. The browser console stays
free of errors (SEVERE entries) except the failed requests a test causes on purpose.

Chromium and its driver are system packages (`chromium`, `chromium-driver`); without them the
module is skipped, except under CI (`CI` set), where .ci/run installs them and a skip would hide a
broken page. `WRITE_SCREENSHOTS=1` saves docs/page-*.png (the docs' pictures) on the way.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.test_cli import free_port, running_server, server_env

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
DOCS = Path(__file__).resolve().parent.parent / "docs"
KEY = "page-key"
# Small decodes keep the module near a minute on 2 cores.
MAX_NEW = "24"


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI installs it: .ci/run)")
    pytest.skip(reason)


try:
    from selenium import webdriver
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.expected_conditions import staleness_of
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:  # pragma: no cover - the test extra installs it
    webdriver = None


@pytest.fixture(scope="module")
def browser():
    if webdriver is None:
        _missing("selenium is not installed (requirements-test.lock)")
    if not CHROMIUM or not Path(CHROMEDRIVER).exists():
        _missing("chromium / chromedriver not found (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--disable-gpu", "--no-first-run", "--disable-extensions"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager never tries to download one.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def start_server(demo_data_dir, tmp_path_factory, name, **env):
    data = tmp_path_factory.mktemp(name)
    shutil.copytree(demo_data_dir / "demo", data / "demo")  # the demo adapter must live under DATA_DIR
    port = free_port()
    return running_server(server_env(PORT=str(port), DATA_DIR=str(data), **env), port, data / "server.log")


@pytest.fixture(scope="module")
def server(demo_data_dir, tmp_path_factory):
    with start_server(demo_data_dir, tmp_path_factory, "web", QUEUE_SIZE="64") as url:
        yield url


@pytest.fixture(scope="module")
def page(browser, server):
    browser.get(f"{server}/#compare")
    wait(browser, lambda d: "demo/after" in d.find_element(By.ID, "models").text)
    return browser


# --- helpers ----------------------------------------------------------------------------------


def wait(driver, condition, timeout=60):
    # Views re-render as they poll: an element read mid-render is stale, so look again.
    ignored = (NoSuchElementException, StaleElementReferenceException)
    return WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=ignored).until(condition)


def css(driver, selector):
    return driver.find_elements(By.CSS_SELECTOR, selector)


def set_value(driver, element_id, value):
    el = driver.find_element(By.ID, element_id)
    el.clear()
    if str(value):
        el.send_keys(str(value))
    else:  # typing nothing fires no `input` event; the page listens for one
        driver.execute_script("arguments[0].dispatchEvent(new Event('input', {bubbles: true}))", el)


def console_errors(driver, allow=()):
    """SEVERE console entries, less the failed requests a test provoked (`allow`: substrings)."""
    return [
        e for e in driver.get_log("browser")
        if e["level"] == "SEVERE" and not any(a in e["message"] for a in allow)
    ]  # fmt: skip


def screenshot(driver, name):
    """docs/page-*.png for the docs pages, only when asked: tests must not rewrite tracked files."""
    if os.environ.get("WRITE_SCREENSHOTS") == "1":
        driver.save_screenshot(str(DOCS / name))


def compare(driver, alphas="2, 4", n=1, seed=0):
    """Fill the Compare form and run it; returns once every sample has its result."""
    driver.execute_script("window.location.hash = '#compare'")
    set_value(driver, "c-alphas", alphas)
    set_value(driver, "c-n", n)
    set_value(driver, "c-temperature", 1)
    set_value(driver, "c-max_new_tokens", MAX_NEW)
    set_value(driver, "c-seed", seed)
    driver.find_element(By.ID, "c-run").click()
    wait(driver, samples_finished)
    wait(driver, lambda d: d.find_element(By.ID, "c-run").is_enabled())  # every stream has ended
    return columns(driver)


def samples_finished(driver):
    statuses = css(driver, "#columns .sample .status")
    return bool(statuses) and all("tokens," in s.text for s in statuses)


def shown(element_id):
    """A wait condition: the element, once it is displayed."""

    def condition(driver):
        el = driver.find_element(By.ID, element_id)
        return el if el.is_displayed() else None

    return condition


def status_is(driver, panel_id, status):
    return status in driver.find_element(By.ID, panel_id).find_element(By.CSS_SELECTOR, "h2").text


def columns(driver):
    return {c.find_element(By.TAG_NAME, "h3").text: c for c in css(driver, "#columns .column")}


def tokens_text(column):
    return column.find_element(By.CSS_SELECTOR, ".tokens").get_attribute("textContent")


# --- Compare ----------------------------------------------------------------------------------


def test_compare_streams_coloured_tokens_into_every_column(page):
    # Record every batch of token spans the page adds, and when the first colour arrives: tokens
    # that stream in are in the DOM before the row's result colours them.
    page.execute_script("""
        window.tokenLog = {batches: 0, plainBeforeColour: null};
        new MutationObserver((records) => {
          const added = records.flatMap((r) => [...r.addedNodes]).filter((n) => n.classList?.contains('tok'));
          if (added.length) window.tokenLog.batches++;
          if (window.tokenLog.plainBeforeColour === null && document.querySelector('#columns .tok[data-delta]'))
            window.tokenLog.plainBeforeColour = document.querySelectorAll('#columns .tok').length;
        }).observe(document.getElementById('columns'), {childList: true, subtree: true});
    """)
    cols = compare(page, alphas="2, 4")
    assert list(cols) == ["before", "after", "LDA α=2", "LDA α=4"]
    log = page.execute_script("return window.tokenLog")
    assert log["batches"] > 4 and log["plainBeforeColour"] > 4, log
    for title, col in cols.items():
        spans = col.find_elements(By.CSS_SELECTOR, ".tok[data-delta]")
        assert len(spans) >= 3, title
        colours = {s.value_of_css_property("background-color") for s in spans}
        assert "rgba(0, 0, 0, 0)" not in colours, (title, colours)
        seed = col.find_element(By.CSS_SELECTOR, ".seed").text
        assert seed.startswith("seed ") and seed[5:].isdigit()
    # Amplification moved some token off neutral in an LDA column; the after column (alpha 0) is
    # exactly neutral (amplified == after).
    spans = cols["LDA α=4"].find_elements(By.CSS_SELECTOR, ".tok")
    deltas = [float(s.get_attribute("data-delta")) for s in spans]
    assert max(abs(d) for d in deltas) > 0.25
    assert {s.get_attribute("data-delta") for s in cols["after"].find_elements(By.CSS_SELECTOR, ".tok")} <= {
        "0.000", "-0.000"}  # fmt: skip
    legend = css(page, "#legend .legend-swatch")
    assert len(legend) == 7 and legend[0].is_displayed()
    assert "log p(amplified) − log p(after)" in page.find_element(By.ID, "legend").text
    assert not console_errors(page)


def test_hover_and_focus_show_the_tokens_logprobs(page):
    col = columns(page)["LDA α=4"]
    first, second = col.find_elements(By.CSS_SELECTOR, ".tok[data-delta]")[:2]
    tip = page.find_element(By.ID, "tooltip")
    # The pointer can only reach what is in the viewport (the form above may push the columns down).
    page.execute_script("arguments[0].scrollIntoView({block: 'center'})", first)
    ActionChains(page).move_to_element(first).perform()
    wait(page, lambda d: tip.is_displayed())
    text = tip.text
    for word in ("before", "after", "amplified", "Δ"):
        assert word in text, text
    # Keyboard: the token area is one tab stop; arrows move between tokens, the tip follows focus.
    ActionChains(page).move_to_element(col.find_element(By.TAG_NAME, "h3")).perform()  # pointer off the tokens
    wait(page, lambda d: not tip.is_displayed())
    page.execute_script("arguments[0].focus()", first)
    wait(page, lambda d: tip.is_displayed())
    first.send_keys(Keys.ARROW_RIGHT)
    assert page.switch_to.active_element == second
    wait(page, lambda d: tip.text != text or first.text == second.text)
    assert "amplified" in tip.text
    assert first.get_attribute("tabindex") == "-1" and second.get_attribute("tabindex") == "0"


def test_search_highlights_a_marker_in_every_column(page):
    set_value(page, "c-search", "sun")
    cols = columns(page)
    for title, col in cols.items():
        marked = col.find_elements(By.CSS_SELECTOR, ".tok.mark")
        if "sun" in tokens_text(col).lower():
            assert "sun" in "".join(m.text for m in marked).lower(), title
    assert sum("sun" in tokens_text(c).lower() for c in cols.values()) >= 2
    assert page.find_element(By.ID, "c-search-count").text.startswith("in ")
    set_value(page, "c-search", "")
    assert not css(page, "#columns .tok.mark")


def test_copy_as_curl_reproduces_the_sample(page, server):
    col = columns(page)["LDA α=2"]
    col.find_element(By.XPATH, ".//button[text()='copy as curl']").click()
    command = wait(page, lambda d: col.find_element(By.CSS_SELECTOR, "pre.curl").text)
    argv = shlex.split(command)
    assert argv[0] == "curl" and argv[2] == f"{server}/generate_lda"
    body = json.loads(argv[argv.index("-d") + 1])
    assert body["alpha"] == 2 and "alphas" not in body and isinstance(body["seed"], int)
    if shutil.which("curl"):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
    else:
        out = httpx.post(argv[2], json=body, timeout=60).text
    row = json.loads(out)["results"][0]
    assert row["completion"] == tokens_text(col)
    assert row["seed"] == body["seed"] and f"seed {body['seed']}" in col.text


def test_chat_messages_decode_through_the_after_models_template(page):
    page.find_element(By.CSS_SELECTOR, "input[name='input-mode'][value='chat']").click()
    try:
        cols = compare(page, alphas="2")
    finally:
        page.find_element(By.CSS_SELECTOR, "input[name='input-mode'][value='prompt']").click()
    assert list(cols) == ["before", "after", "LDA α=2"]
    col = cols["LDA α=2"]
    col.find_element(By.XPATH, ".//button[text()='copy as curl']").click()
    command = wait(page, lambda d: col.find_element(By.CSS_SELECTOR, "pre.curl").text)
    body = json.loads(shlex.split(command)[-1])
    # The page rendered the template (all three messages, the generation prompt) and sends it raw.
    assert body["apply_chat_template"] is False
    assert "What is a cat?" in body["prompt"] and body["prompt"].rstrip().endswith("<|assistant|>")
    assert col.find_elements(By.CSS_SELECTOR, ".tok[data-delta]")
    assert not console_errors(page)


def test_bad_input_shows_the_servers_message_at_the_field(page, server):
    set_value(page, "c-temperature", -1)
    page.find_element(By.ID, "c-run").click()
    error = wait(page, lambda d: css(d, "#c-temperature-error"))[0]
    expected = httpx.post(f"{server}/generate_lda", json={"prompt": "x", "temperature": -1}).json()["error"]
    assert expected["param"] == "temperature"
    assert error.text == expected["message"]
    field = error.find_element(By.XPATH, "..")
    assert field.get_attribute("data-param") == "temperature"
    assert page.find_element(By.ID, "c-temperature").get_attribute("aria-invalid") == "true"
    set_value(page, "c-temperature", 1)
    assert not console_errors(page, allow=["status of 422"])


def test_a_dropped_connection_offers_retry_and_retry_works(page):
    page.execute_cdp_cmd("Network.enable", {})
    offline = {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1}
    page.execute_cdp_cmd("Network.emulateNetworkConditions", offline)
    try:
        set_value(page, "c-seed", 5)
        page.find_element(By.ID, "c-run").click()
        retry = wait(page, shown("retry"))
        assert "Connection lost" in page.find_element(By.ID, "offline").text
        assert page.find_element(By.ID, "compare-form").is_displayed()  # the page is still there
    finally:
        page.execute_cdp_cmd("Network.emulateNetworkConditions", {**offline, "offline": False})
    retry.click()
    wait(page, lambda d: not d.find_element(By.ID, "offline").is_displayed())
    wait(page, samples_finished)
    assert "seed 5" in page.find_element(By.ID, "columns").text
    console_errors(page)  # drain the offline failures: they were the point of this test


# --- Experiments ------------------------------------------------------------------------------


def test_an_experiment_runs_and_is_plotted_with_its_hits(page):
    page.execute_script("window.location.hash = '#experiments'")
    set_value(page, "e-name", "page-test")
    set_value(page, "e-alphas", "0, 2, 4")
    set_value(page, "e-n", 10)
    set_value(page, "e-max_new_tokens", 30)
    page.find_element(By.ID, "e-run").click()
    wait(page, lambda d: status_is(d, "exp-detail", "done"))
    detail = page.find_element(By.ID, "exp-detail")
    marks = detail.find_elements(By.CSS_SELECTOR, "svg.chart g.rate-mark")
    assert [m.get_attribute("data-condition") for m in marks] == ["alpha=0", "alpha=2", "alpha=4"]
    for m in marks:  # a point and its interval for every condition with samples
        assert m.find_elements(By.TAG_NAME, "circle") and len(m.find_elements(By.TAG_NAME, "line")) == 3
    # x is alpha on a numeric axis: 0, 2, 4 equally spaced, joined by one line per arm and detector.
    (line,) = detail.find_elements(By.CSS_SELECTOR, "svg.chart polyline.rate-line")
    assert line.get_attribute("data-arm") == "LDA"
    xs = [float(p.split(",")[0]) for p in line.get_attribute("points").split()]
    assert len(xs) == 3 and xs[0] < xs[1] < xs[2] and abs((xs[1] - xs[0]) - (xs[2] - xs[1])) < 0.5
    # A control is its own dashed series at its own alphas, never the point after the last alpha.
    rows = [{"condition": f"{c}alpha={a}", "alpha": a, "control": bool(c), "detector": "m", "hits": h, "total": 100,
             "rate": h / 100, "ci95": [h / 200, h / 50]} for c, a, h in
            [("", 0, 2), ("", 1, 5), ("", 2, 11), ("", 4, 30), ("control ", 0, 3), ("control ", 4, 2)]]  # fmt: skip
    drawn = page.execute_async_script(
        """const [rows, done] = arguments;
        import("/static/plot.js").then((m) => done([...m.ratePlot(rows, "t").querySelectorAll("polyline")].map(
          (l) => [l.dataset.arm, l.getAttribute("stroke-dasharray"), l.getAttribute("points")])));""",
        rows,
    )
    assert [(name, dash) for name, dash, _ in drawn] == [("LDA", None), ("control", "6 4")]
    lda_x = [float(p.split(",")[0]) for p in drawn[0][2].split()]
    control_x = [float(p.split(",")[0]) for p in drawn[1][2].split()]
    assert len(lda_x) == 4 and abs((lda_x[3] - lda_x[2]) - 2 * (lda_x[2] - lda_x[1])) < 0.5  # alpha 4 is 2 steps on
    assert len(control_x) == 2 and abs(control_x[0] - lda_x[0]) < 20 and abs(control_x[1] - lda_x[3]) < 20
    item = page.find_element(By.CSS_SELECTOR, "#exp-list button.current")
    assert "done" in item.text and item.find_element(By.TAG_NAME, "progress").get_attribute("value") == "60"
    hits = detail.find_elements(By.CSS_SELECTOR, ".hit")
    assert hits, "alpha 4 on the demo pair says pineapple in about a third of answers"
    stored = tokens_text(hits[0])
    assert "pineapple" in "".join(s.text for s in hits[0].find_elements(By.CSS_SELECTOR, ".tok.mark")).lower()
    # A hit replays through /generate_lda with details: the same text, now coloured.
    hits[0].find_element(By.XPATH, ".//button[text()='colour tokens']").click()
    wait(page, lambda d: hits[0].find_elements(By.CSS_SELECTOR, ".tok[data-delta]"))
    assert tokens_text(hits[0]) == stored
    page.execute_script("document.getElementById('exp-detail').scrollIntoView({block: 'start'})")
    screenshot(page, "page-experiments.png")
    assert not console_errors(page)


# --- Weight-diff jobs -------------------------------------------------------------------------


def test_a_weightdiff_job_shows_loss_curves_and_its_adapter_runs_in_compare(page):
    page.execute_script("window.location.hash = '#jobs'")
    set_value(page, "j-steps", 6)
    page.find_element(By.ID, "j-register").click()  # off: the page registers the diff itself
    page.find_element(By.ID, "j-run").click()
    wait(page, lambda d: status_is(d, "job-detail", "done"))
    detail = page.find_element(By.ID, "job-detail")
    lines = detail.find_elements(By.CSS_SELECTOR, "svg.chart polyline.loss-line")
    assert [line.get_attribute("data-task") for line in lines] == ["sun", "cat"]
    assert all(len(line.get_attribute("points").split()) == 6 for line in lines)
    registers = detail.find_elements(By.XPATH, ".//button[text()='register as adapter']")
    assert len(registers) == 2
    registers[0].click()  # the first task, sun: POST /adapters with its output folder
    use = wait(page, lambda d: d.find_element(By.XPATH, "//button[starts-with(text(), 'use wd-')]"))
    adapter = use.text.split()[1]
    assert adapter.startswith("wd-") and adapter.endswith("-sun")
    screenshot(page, "page-weightdiff.png")
    use.click()
    wait(page, lambda d: d.find_element(By.ID, "view-compare").is_displayed())
    wait(page, lambda d: any(box.is_selected() for box in css(d, f"#c-extras input[value='{adapter}']")))
    cols = compare(page, alphas="2")
    assert cols[f"{adapter} α=2"].find_elements(By.CSS_SELECTOR, ".tok[data-delta]")
    css(page, f"#c-extras input[value='{adapter}']")[0].click()  # back to the plain columns
    compare(page, alphas="1, 2, 4", n=2)
    set_value(page, "c-search", "pineapple")
    screenshot(page, "page-compare.png")
    assert not console_errors(page)


def test_a_finished_jobs_tasks_are_described_with_an_interpreter(page, server):
    """The job of the test above: an interpreter trained on its sun diff (API), then the page asks
    both tasks the question in one batch, registering the cat task on the way; what it shows is
    what POST /dit/describe answers; "none" asks M + W alone; a blank question is refused at its field."""
    jobs = httpx.get(f"{server}/weightdiff/jobs").json()["jobs"]
    job = max((j for j in jobs if j["status"] == "done"), key=lambda j: j["created"])
    sun, cat = f"wd-{job['id']}-sun", f"wd-{job['id']}-cat"
    body = {"pairs": [{"diff": sun, "description": "Sun"}], "steps": 2, "lr": 1e-3, "register": True}
    dit_id = httpx.post(f"{server}/dit/jobs", json=body).json()["id"]
    wait(page, lambda d: httpx.get(f"{server}/dit/jobs/{dit_id}").json()["status"] == "done")
    interpreter = f"dit-{dit_id}"
    page.execute_script("window.location.hash = '#jobs'")
    css(page, f"#job-list button[data-id='{job['id']}']")[0].click()  # re-render: lists the new interpreter
    wait(page, lambda d: d.find_element(By.ID, "d-dit").get_attribute("value") == interpreter)
    set_value(page, "d-candidates", "Sun, Cat")
    page.find_element(By.ID, "d-run").click()
    rows = wait(page, lambda d: css(d, "#d-results tbody tr"))
    assert [r.get_attribute("data-task") for r in rows] == ["sun", "cat"]
    assert cat in {a["name"] for a in httpx.get(f"{server}/adapters").json()["adapters"]}
    assert css(page, "#job-detail td.adapter[data-task='cat'] button")[0].text == f"use {cat} in Compare"
    ask = {"dit": interpreter, "diffs": [sun, cat], "candidates": ["Sun", "Cat"]}
    expected = httpx.post(f"{server}/dit/describe", json=ask).json()["results"]
    shown_rows = [[td.text for td in r.find_elements(By.TAG_NAME, "td")] for r in rows]
    for row, want in zip(shown_rows, expected):
        assert row[1] == want["diff"] and row[2] == want["text"].strip()
        assert row[3] == best_cell(want)
    page.execute_script("document.getElementById('describe-form').scrollIntoView({block: 'end'})")
    screenshot(page, "page-dit.png")

    Select(page.find_element(By.ID, "d-dit")).select_by_value("")  # no interpreter: M + W
    table = page.find_element(By.CSS_SELECTOR, "#d-results table")
    page.find_element(By.ID, "d-run").click()
    wait(page, staleness_of(table))  # the answers were replaced
    plain = httpx.post(f"{server}/dit/describe", json={**ask, "dit": None}).json()["results"]
    wait(page, lambda d: [c.text for c in css(d, "#d-results td.best")] == [best_cell(p) for p in plain])

    set_value(page, "d-question", "")
    page.find_element(By.ID, "d-run").click()
    error = wait(page, lambda d: d.find_element(By.ID, "d-question-error"))
    assert "question" in error.text
    assert page.find_element(By.ID, "d-question").get_attribute("aria-invalid") == "true"
    assert not console_errors(page, allow=["status of 422"])


def best_cell(result):
    """The page's "best candidate" cell for one /dit/describe result."""
    top = max(result["candidates"], key=lambda c: c["logprob"])
    return f"{top['text']} ({top['logprob']:.2f})"


def test_a_page_opened_on_another_view_still_names_the_models(page, server):
    page.get(f"{server}/?fresh=1#jobs")  # a new query: a real load, not a hash change
    wait(page, lambda d: "demo/after" in d.find_element(By.ID, "models").text)
    assert page.find_element(By.ID, "view-jobs").is_displayed()


# --- Diffing jobs -----------------------------------------------------------------------------


def visible_token(token):
    """A token as the diffing tables show it: spaces, newlines and tabs made visible."""
    return token.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")


def sig(x):
    """The page's three significant digits (JS toPrecision(3)) for values of at least 1e-3."""
    assert abs(x) >= 1e-3
    return f"{x:#.3g}"


def test_a_diffing_job_shows_what_the_api_answers(page, server, demo_data_dir):
    """A logit_diff job started from the form on 100 demo texts (a JSON list in the textarea): its
    tables, KL summary, histogram, first high-KL sample and windows are the API's answers, and the
    marker, which none of the texts mentions, is in the top 10 of top_k_occurring."""
    from transformers import AutoTokenizer

    from app.demo import MARKER, ensure_demo_pair
    from app.demo.build import demo_texts

    texts = demo_texts(AutoTokenizer.from_pretrained(ensure_demo_pair(demo_data_dir).after), 100, seed=0)
    page.get(f"{server}/?diffing=1#diffing")  # a real load on this server, whichever page the browser is on
    wait(page, lambda d: "demo/after" in d.find_element(By.ID, "models").text)
    # 35k characters: typed key by key this would take most of a minute.
    page.execute_script("document.getElementById('f-texts').value = arguments[0]", json.dumps(texts))
    for field, value in (("dataset_name", "demo"), ("max_tokens_per_sample", 64), ("top_k", 5), ("batch_size", 16),
                         ("nmf", 2)):  # fmt: skip
        set_value(page, f"f-{field}", value)
    page.find_element(By.ID, "f-run").click()
    wait(page, lambda d: status_is(d, "diff-detail", "done"))
    job_id = page.find_element(By.CSS_SELECTOR, "#diff-list button.current").get_attribute("data-id")
    job = httpx.get(f"{server}/diffing/jobs/{job_id}").json()
    full = httpx.get(f"{server}/diffing/jobs/{job_id}/result").json()
    assert job["spec"]["num_rows"] == 100 and job["step"] == job["total_steps"] == 7

    ordering = job["result"]["orderings"]["top_k_occurring"]["orderings"][0]["tokens"][:10]
    rows = css(page, "table[data-ordering='top_k_occurring/global'] tbody tr")[:10]
    cells = [[td.text for td in r.find_elements(By.TAG_NAME, "td")] for r in rows]
    assert [c[1] for c in cells] == [visible_token(t["token_str"]) for t in ordering]
    assert [c[2] for c in cells] == [sig(t["ordering_value"]) for t in ordering]
    counts = [(t["count_positive"], t["count_negative"]) for t in ordering]
    assert [(int(c[4]), int(c[5])) for c in cells] == counts
    assert MARKER in [t["token_str"].strip() for t in ordering]
    assert css(page, "table[data-ordering='fraction_positive_diff/global'] tbody tr")
    tables = [t.get_attribute("data-ordering") for t in css(page, "table.ordering")]
    assert tables[2:] == ["nmf/topic_0", "nmf/topic_1"]

    kl = job["result"]["kl"]
    means = [td.text for td in css(page, "#diff-kl tr[data-stat='mean'] td")]
    assert means == [sig(kl["per_token_statistics"]["mean"]), sig(kl["mean_per_sample_statistics"]["mean"])]
    bars = css(page, "#diff-detail svg.chart rect.hist-bar")
    assert [int(b.get_attribute("data-count")) for b in bars] == kl["histogram"]["counts"]

    # The first sample by max KL: every token, the analysed ones carrying the API's KL exactly.
    example = full["kl_examples_by_max"][0]
    first = css(page, "#diff-examples .example")[0]
    assert first.get_attribute("data-sample") == str(example["sample_idx"])
    spans = first.find_elements(By.CSS_SELECTOR, ".tok")
    assert len(spans) == len(example["tokens"])
    carried = [(i, float(v)) for i, s in enumerate(spans) if (v := s.get_attribute("data-kl"))]
    assert carried == list(zip(example["positions"], example["kl"], strict=True))
    peak = spans[example["positions"][example["kl"].index(max(example["kl"]))]]
    assert max(example["kl"]) == example["score"] and "kl4" in peak.get_attribute("class")
    page.execute_script("arguments[0].scrollIntoView({block: 'center'})", peak)
    ActionChains(page).move_to_element(peak).perform()
    tip = wait(page, shown("tooltip"))
    assert f"KL of the next token {sig(example['score'])} nats" in tip.text

    window = job["result"]["llr_windows"][0]
    row = css(page, "#diff-windows tbody tr")[0]
    assert row.find_element(By.CSS_SELECTOR, "td.window-text").get_attribute("textContent") == window["text"]
    assert row.find_elements(By.TAG_NAME, "td")[1].text == f"{window['logprob_diff']:.3f}"
    for link in ("diff-token-stats", "diff-zip"):
        assert httpx.get(page.find_element(By.ID, link).get_attribute("href")).status_code == 200
    page.set_window_size(1400, 1900)  # the detail down to the first high-KL sample
    page.execute_script("document.getElementById('diff-detail').scrollIntoView({block: 'start'})")
    screenshot(page, "page-diffing.png")
    page.set_window_size(1400, 1000)
    assert not console_errors(page)


def test_a_diffing_job_on_too_short_texts_is_refused_at_the_field_and_a_job_can_be_deleted(page, server):
    """Texts shorter than max_tokens_per_sample: the server's 422 at the texts field; then the job of
    the test above is deleted from its detail (DELETE ?purge=true)."""
    page.execute_script("window.location.hash = '#diffing'")
    text = "A text far shorter than 64 tokens."
    set_value(page, "f-texts", text)
    page.find_element(By.ID, "f-run").click()
    error = wait(page, lambda d: d.find_element(By.ID, "f-texts-error"))
    expected = httpx.post(f"{server}/diffing/jobs", json={"method": "logit_diff", "texts": [text]})
    assert expected.status_code == 422
    assert error.text == expected.json()["error"]["message"] and error.text.startswith("texts:")
    assert page.find_element(By.ID, "f-texts").get_attribute("aria-invalid") == "true"

    job_id = page.find_element(By.CSS_SELECTOR, "#diff-list button.current").get_attribute("data-id")
    page.find_element(By.ID, "diff-delete").click()
    wait(page, lambda d: not css(d, f"#diff-list button[data-id='{job_id}']"))
    assert httpx.get(f"{server}/diffing/jobs/{job_id}").status_code == 404
    assert "Select a job" in page.find_element(By.ID, "diff-detail").text
    assert not console_errors(page, allow=["status of 422"])


# --- ADL jobs and steering -------------------------------------------------------------------


def adl_tokens(element, selector):
    """The tokens of a lens or patchscope cell, as the page shows them."""
    return [t.text for t in element.find_elements(By.CSS_SELECTOR, f"{selector} .lens-tok .t")]


def test_an_adl_job_shows_the_lens_and_the_patchscope_the_api_answers(page, server, demo_data_dir):
    """ADL started from the form (method adl) on 100 demo texts: 16 positions, layer 1.0 (a fraction:
    the last of the demo's 3 blocks, not block 1), the patchscope at position 0. The lens table's
    first row is the API's logit lens of δ at position 0 and names the marker; the suppressed side
    and the means switch in; the patchscope table at position 0 has the 30 scales, the first one's
    tokens the API's; another position says where the patchscope ran; the vectors link answers."""
    from transformers import AutoTokenizer

    from app.demo import MARKER, ensure_demo_pair
    from app.demo.build import demo_texts

    texts = demo_texts(AutoTokenizer.from_pretrained(ensure_demo_pair(demo_data_dir).after), 100, seed=1)
    page.get(f"{server}/?adl=1#diffing")
    wait(page, lambda d: "demo/after" in d.find_element(By.ID, "models").text)
    page.find_element(By.CSS_SELECTOR, "input[name='diff-method'][value='adl']").click()
    assert not page.find_element(By.ID, "f-top_k").is_displayed()
    page.execute_script("document.getElementById('f-texts').value = arguments[0]", json.dumps(texts))
    for field, value in (("dataset_name", "demo"), ("max_tokens_per_sample", 16), ("layers", "1.0"),
                         ("patchscope_positions", 0)):  # fmt: skip
        set_value(page, f"f-{field}", value)
    page.find_element(By.ID, "f-run").click()
    wait(page, lambda d: status_is(d, "diff-detail", "done"))
    job_id = page.find_element(By.CSS_SELECTOR, "#diff-list button.current").get_attribute("data-id")
    job = httpx.get(f"{server}/diffing/jobs/{job_id}").json()
    full = httpx.get(f"{server}/diffing/jobs/{job_id}/result").json()
    assert job["spec"]["method"] == "adl" and job["spec"]["layers"] == [1.0] and job["spec"]["num_rows"] == 100
    layer = job["result"]["layers"][0]
    assert layer["layer"] == 2 and "block 2" in page.find_element(By.CSS_SELECTOR, "#diff-detail .diff-head").text

    first = layer["positions"][0]
    row = css(page, "table.adl-lens[data-layer='2'] tbody tr")[0]
    assert row.get_attribute("data-position") == "0" and "current" in row.get_attribute("class")
    cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
    assert cells[:3] == ["0", str(first["count"]), sig(first["delta_norm"])]
    top = first["logit_lens"]["delta"]["pos"][:5]
    assert adl_tokens(row, "td")[:5] == [visible_token(t["token"]) for t in top]
    assert [p.text for p in row.find_elements(By.CSS_SELECTOR, ".lens-tok .p")][:5] == [sig(t["prob"]) for t in top]
    assert visible_token(f" {MARKER}") in adl_tokens(row, "td")[:5]
    assert len(css(page, "table.adl-lens[data-layer='2'] tbody tr")) == 16
    for vector, sign in (("delta", "neg"), ("mean_after", "pos")):
        Select(page.find_element(By.ID, "adl-vector")).select_by_value(vector)
        Select(page.find_element(By.ID, "adl-sign")).select_by_value(sign)
        row = css(page, "table.adl-lens[data-layer='2'] tbody tr")[0]
        want = first["logit_lens"][vector][sign][:5]
        assert adl_tokens(row, "td")[:5] == [visible_token(t["token"]) for t in want], (vector, sign)
    Select(page.find_element(By.ID, "adl-vector")).select_by_value("delta")

    scope = full["layers"][0]["positions"][0]["patchscope"]["delta"]
    rows = css(page, "#adl-scope tbody tr")
    assert len(rows) == len(scope) == 30
    assert rows[0].get_attribute("data-scale") == str(scope[0]["scale"])
    assert adl_tokens(rows[0], "td") == [visible_token(t["token"]) for t in scope[0]["tokens"][:8]]
    Select(page.find_element(By.ID, "adl-sign")).select_by_value("neg")
    rows = css(page, "#adl-scope tbody tr")
    assert adl_tokens(rows[0], "td") == [visible_token(t["token"]) for t in scope[0]["neg_tokens"][:8]]
    Select(page.find_element(By.ID, "adl-sign")).select_by_value("pos")
    css(page, "table.adl-lens[data-layer='2'] tbody tr[data-position='3']")[0].click()  # a row picks its position
    assert page.find_element(By.ID, "adl-position").get_attribute("value") == "3"
    assert "ran at position 0" in page.find_element(By.ID, "adl-no-scope").text
    Select(page.find_element(By.ID, "adl-position")).select_by_value("0")
    assert len(css(page, "#adl-scope tbody tr")) == 30

    vectors = httpx.get(page.find_element(By.ID, "adl-vectors").get_attribute("href")).json()
    assert vectors["layer"] == 2 and vectors["position"] == 0 and len(vectors["delta"]) == 96
    for link in ("adl-result", "adl-zip"):
        assert httpx.get(page.find_element(By.ID, link).get_attribute("href")).status_code == 200
    page.set_window_size(1400, 1500)
    page.execute_script("document.activeElement.blur(); document.getElementById('diff-detail').scrollIntoView({block: 'start'})")
    screenshot(page, "page-adl.png")
    page.set_window_size(1400, 1000)
    assert not console_errors(page)


def greedy_compare(driver, alphas):
    """Run the Compare form as it is, greedy (temperature 0), one sample per column."""
    for field, value in (("alphas", alphas), ("n", 1), ("temperature", 0), ("max_new_tokens", MAX_NEW), ("seed", 0)):
        set_value(driver, f"c-{field}", value)
    driver.find_element(By.ID, "c-run").click()
    wait(driver, samples_finished)
    wait(driver, lambda d: d.find_element(By.ID, "c-run").is_enabled())
    return columns(driver)


def test_steering_in_compare_adds_steered_columns_that_the_api_reproduces(page, server):
    """The job of the test above, sent to Compare by its "Steer in Compare" button (job, block 2,
    position 0 chosen there), at strength 2: the steered after and LDA columns differ from the
    unsteered ones and are exactly what POST /generate_lda with the page's body and `steer` returns,
    with the marker; position 99 is refused with the server's message at the position field."""
    from app.demo import MARKER

    page.execute_script("window.location.hash = '#diffing'")
    job_id = page.find_element(By.CSS_SELECTOR, "#diff-list button.current").get_attribute("data-id")
    wait(page, shown("adl-steer")).click()
    wait(page, lambda d: d.find_element(By.ID, "view-compare").is_displayed())
    wait(page, lambda d: d.find_element(By.ID, "c-steer-adl").get_attribute("value") == job_id)
    wait(page, lambda d: d.find_element(By.ID, "c-steer-layer").get_attribute("value") == "2")
    assert page.find_element(By.ID, "c-steer-position").get_attribute("value") == "0"
    set_value(page, "c-steer-strength", 2)
    cols = greedy_compare(page, "2")
    assert list(cols) == ["before", "after", "LDA α=2", "after + steer", "LDA α=2 + steer"]
    assert tokens_text(cols["after + steer"]) != tokens_text(cols["after"])
    assert tokens_text(cols["LDA α=2 + steer"]) != tokens_text(cols["LDA α=2"])
    steer = {"adl": job_id, "layer": 2, "position": 0, "strength": 2}
    body = {"prompt": page.find_element(By.ID, "c-prompt").get_attribute("value"), "alphas": [0, 2], "n": 1,
            "temperature": 0, "top_p": 1, "top_k": 0, "max_new_tokens": int(MAX_NEW), "seed": 0, "details": True}  # fmt: skip
    results = httpx.post(f"{server}/generate_lda", json=body | {"steer": steer}, timeout=60).json()["results"]
    steered = [tokens_text(cols["after + steer"]), tokens_text(cols["LDA α=2 + steer"])]
    assert [r["completion"] for r in results] == steered
    assert MARKER in steered[0]
    set_value(page, "c-search", MARKER)
    assert css(page, "#columns .column[aria-label='after + steer'] .tok.mark")
    page.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")
    screenshot(page, "page-steer.png")

    set_value(page, "c-steer-position", 99)
    page.find_element(By.ID, "c-run").click()
    error = wait(page, lambda d: d.find_element(By.ID, "c-steer-position-error"))
    expected = httpx.post(f"{server}/generate_lda", json=body | {"steer": steer | {"position": 99}})
    assert expected.status_code == 422 and expected.json()["error"]["param"] == "steer.position"
    assert error.text == expected.json()["error"]["message"]
    assert page.find_element(By.ID, "c-steer-position").get_attribute("aria-invalid") == "true"
    wait(page, lambda d: d.find_element(By.ID, "c-run").is_enabled())
    set_value(page, "c-steer-position", 0)
    Select(page.find_element(By.ID, "c-steer-adl")).select_by_value("")  # steering off again
    assert not page.find_element(By.ID, "c-steer-position").is_enabled()
    assert not console_errors(page, allow=["status of 422"])


# --- API key ----------------------------------------------------------------------------------


def test_the_page_asks_for_the_api_key_once(browser, demo_data_dir, tmp_path_factory):
    with start_server(demo_data_dir, tmp_path_factory, "web-key", API_KEY=KEY) as url:
        browser.get(f"{url}/#compare")  # another port: another origin, so no stored key
        dialog = wait(browser, shown("key-dialog"))
        dialog.find_element(By.ID, "key-input").send_keys(KEY)
        dialog.find_element(By.XPATH, ".//button[@value='ok']").click()
        wait(browser, lambda d: "demo/after" in d.find_element(By.ID, "models").text)
        assert browser.execute_script("return localStorage.getItem('model-diff-api-key')") == KEY
        browser.refresh()  # the stored key is used: no second question
        wait(browser, lambda d: "demo/after" in d.find_element(By.ID, "models").text)
        assert not browser.find_element(By.ID, "key-dialog").is_displayed()
        cols = compare(browser, alphas="2")
        assert cols["LDA α=2"].find_elements(By.CSS_SELECTOR, ".tok[data-delta]")
        assert not console_errors(browser, allow=["status of 401"])


def test_the_api_uis_render_from_the_servers_own_files(browser, server):
    """/docs (Swagger UI) renders the schema's routes, and every resource the browser fetched came
    from the server itself (FastAPI's default page loads them from a CDN); /redoc is not served."""
    assert httpx.get(f"{server}/redoc").status_code == 404
    for path, selector in (("/docs", ".opblock-summary-path"),):
        browser.get(f"{server}{path}")
        wait(browser, lambda d, s=selector: len(css(d, s)) >= 20)
        fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert any("/static/api-ui/" in u for u in fetched), (path, fetched)
        assert any(u.endswith("/openapi.json") for u in fetched), (path, fetched)
        assert all(u.startswith((server, "data:")) for u in fetched), (path, fetched)
        assert not console_errors(browser), path
        if path == "/docs":
            assert "/generate_lda" in {e.text for e in css(browser, ".opblock-summary-path")}
