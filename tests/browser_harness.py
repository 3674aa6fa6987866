"""What a learner sees: the notebooks' widgets in a real browser (the harness of tests/test_browser_a.py and _b.py).

JupyterLab (from this environment, on a free loopback port, in quick mode) serves a copy of notebooks/; Debian's
Chromium, headless and driven by Playwright, opens each notebook with a main widget, runs all cells, checks that no
cell shows an error, moves the slider with the keyboard as a person would, and checks that the picture changed.
Screenshots before and after go to runs/browser/ (or $COURSE_SCREENSHOTS) for a person to look at.

The notebooks are split over two test files (CASES names which), each with its own JupyterLab and Chromium, so that
`make test`'s workers run the two halves side by side instead of one worker running all of them after the rest.

Needs the `playwright` package (in the test extra) and Chromium at $CHROMIUM, /usr/bin/chromium or on PATH (Debian's
package `chromium`: apt-get install chromium; .ci/run installs it). Playwright's own browser download is never used.
Without either the tests are skipped with the reason, except under CI (CI=true), where they fail: CI must run them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHOTS = Path(os.environ.get("COURSE_SCREENSHOTS", ROOT / "runs" / "browser"))
CHROMIUM = os.environ.get("CHROMIUM") or next((p for p in ("/usr/bin/chromium", shutil.which("chromium"),
                                                           shutil.which("chromium-browser")) if p and Path(p).exists()),
                                              None)
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"]

# notebook, the slider's description, key presses, and the test file that drives it (a or b: about equal time in each)
CASES = [
    ("01_noise_addition.ipynb", "noise level", 2, "a"),
    ("02_forward_markov_chain.ipynb", "T", 2, "a"),
    ("05_sampling.ipynb", "step", 2, "a"),
    ("06_vae_latent_space.ipynb", "alpha", 2, "b"),
    ("08_text_encoder.ipynb", "k", 1, "b"),
    ("09_text_to_image.ipynb", "guidance", 2, "b"),
    ("10_lora.ipynb", "LoRA scale", 1, "a"),
    ("13_rectified_flow.ipynb", "steps", 2, "a"),
    ("15_editing.ipynb", "strength", 2, "b"),
    ("17_control.ipynb", "scale", 1, "b"),
    ("19_memory_budget.ipynb", "batch", 2, "b"),
]


def cases(part: str) -> list[tuple[str, str, int]]:
    """The (notebook, slider, presses) of the test file `part` ("a" or "b")."""
    if part not in ("a", "b"):
        raise ValueError(f"part must be 'a' or 'b', got {part!r}")
    return [case[:3] for case in CASES if case[3] == part]


IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
try:
    import playwright.sync_api as playwright_api
except ImportError:
    playwright_api = None
_missing = ("needs the playwright package (pip install -e '.[test]')" if playwright_api is None else
            "needs Chromium: apt-get install chromium (or set CHROMIUM to its path)" if CHROMIUM is None else None)


def require_browser() -> None:
    """Called at the top of each browser test module: skip it with the reason where Playwright or Chromium is
    missing, fail instead under CI (CI=true), and fail where ipywidgets is older than 8."""
    if _missing is None:
        import ipywidgets
        if int(ipywidgets.__version__.split(".")[0]) < 8:
            pytest.fail(f"JupyterLab 4 renders only ipywidgets 8 widgets; this environment has "
                        f"{ipywidgets.__version__} (Colab's version, which only Colab's own front end renders): "
                        f"pip install 'ipywidgets>=8.1,<9'", pytrace=False)
    if _missing and IN_CI:
        pytest.fail(f"the browser test must run in CI: {_missing}", pytrace=False)
    if _missing:
        pytest.skip(_missing, allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab in quick mode on a free port, serving a copy of notebooks/ (running them must not
    rewrite the committed files)."""
    work = tmp_path_factory.mktemp("lab")
    shutil.copytree(ROOT / "notebooks", work / "notebooks", ignore=shutil.ignore_patterns("runs", ".ipynb_checkpoints"))
    port, token = _free_port(), "course-browser-test"
    # every cell in the page (JupyterLab 4 otherwise only renders the cells in view), and no news pop-up
    settings = work / "settings"
    (settings / "@jupyterlab" / "notebook-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings").write_text(
        '{"windowingMode": "none"}')
    (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        '{"fetchNews": "false"}')
    env = dict(os.environ, COURSE_QUICK="1", OMP_NUM_THREADS="1", JUPYTER_CONFIG_DIR=str(work / "config"),
               JUPYTER_RUNTIME_DIR=str(work / "runtime"), JUPYTER_DATA_DIR=str(work / "data"),
               JUPYTERLAB_SETTINGS_DIR=str(settings))
    env.pop("JUPYTER_PATH", None)
    log = open(work / "lab.log", "w")
    jupyter = Path(sys.executable).with_name("jupyter")
    proc = subprocess.Popen([str(jupyter), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                             f"--IdentityProvider.token={token}", "--LabApp.expose_app_in_browser=True",
                             f"--ServerApp.root_dir={work / 'notebooks'}", "--allow-root"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            if proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited: {(work / 'lab.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("JupyterLab did not answer within 60 s")
        yield url, token
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


APP = "window.jupyterapp.shell.currentWidget"
ALL_RAN = f"""() => {{
    const panel = {APP};
    const cells = panel.content.widgets.filter(c => c.model.type === 'code');
    return cells.length > 0 && cells.every(c => c.model.executionCount > 0) &&
           panel.sessionContext.session.kernel.status === 'idle';
}}"""
ERRORS = """() => Array.from(document.querySelectorAll('[data-mime-type="application/vnd.jupyter.stderr"]'))
                  .map(e => e.innerText).filter(t => /Traceback|Error/.test(t)).map(t => t.slice(0, 500))"""
WIDGET_IMAGES = """() => Array.from(document.querySelectorAll('.jupyter-widgets-output-area img, .widget-output img'))
                         .map(i => i.src)"""
# What nbval checks in the cells marked NBVAL_CHECK_OUTPUT, read from the page: each such cell's printed text
# (streams and text/plain results, joined). The conftest skips nbval for a notebook this test drives, so these checks
# are made here instead, against the committed notebook's stored outputs.
CHECKED_OUTPUTS = """() => {APP}.content.widgets
    .filter(c => c.model.type === 'code' && c.model.sharedModel.getSource().includes('NBVAL_CHECK_OUTPUT'))
    .map(c => c.model.outputs.toJSON().map(o => o.output_type === 'stream' ? [].concat(o.text).join('') :
                                                ((o.data || {})['text/plain'] ? [].concat(o.data['text/plain']).join('') : ''))
                                       .join(''))""".replace("{APP}", APP)


def stored_checked_outputs(notebook: str) -> list[str]:
    """The same text of the committed notebook's NBVAL_CHECK_OUTPUT cells."""
    cells = json.loads((ROOT / "notebooks" / notebook).read_text())["cells"]
    text = lambda o: "".join(o.get("text", "")) if o["output_type"] == "stream" else \
        "".join(o.get("data", {}).get("text/plain", ""))                                    # noqa: E731
    return ["".join(text(o) for o in c.get("outputs", [])) for c in cells
            if c["cell_type"] == "code" and "NBVAL_CHECK_OUTPUT" in "".join(c["source"])]


def run_case(lab, browser, notebook: str, slider: str, presses: int) -> None:
    """Open `notebook`, run every cell, check its errors and checked outputs, press the right arrow `presses` times on
    the slider labelled `slider`, and check that its value and its picture changed."""
    url, token = lab
    SHOTS.mkdir(parents=True, exist_ok=True)
    stem = notebook.removesuffix(".ipynb")
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        # a workspace of its own, reset, so no other notebook is restored beside this one
        page.goto(f"{url}/lab/workspaces/{stem}/tree/{notebook}?reset&token={token}")
        page.wait_for_function(f"window.jupyterapp && {APP} && {APP}.sessionContext && {APP}.sessionContext.session"
                               f" && {APP}.sessionContext.session.kernel"
                               f" && {APP}.sessionContext.session.kernel.status === 'idle'", timeout=120_000)
        assert page.evaluate(f"{APP}.context.path") == notebook
        page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        page.wait_for_function(ALL_RAN, timeout=600_000, polling=1000)
        assert page.evaluate(ERRORS) == [], f"{notebook}: a cell shows an error"
        shown, stored = page.evaluate(CHECKED_OUTPUTS), stored_checked_outputs(notebook)
        assert [t.strip() for t in shown] == [t.strip() for t in stored], \
            f"{notebook}: a cell marked NBVAL_CHECK_OUTPUT printed other text than the committed notebook"

        box = page.locator(".widget-slider", has=page.locator(".widget-label", has_text=slider)).first
        box.scroll_into_view_if_needed()
        page.wait_for_function(f"({WIDGET_IMAGES})().length > 0", timeout=120_000)
        before = page.evaluate(WIDGET_IMAGES)
        value_before = box.locator(".widget-readout").inner_text()
        page.screenshot(path=str(SHOTS / f"{stem}_before.png"))
        handle = box.locator(".noUi-handle").first
        handle.focus()
        for _ in range(presses):
            handle.press("ArrowRight")
        page.wait_for_function(f"(before) => JSON.stringify(({WIDGET_IMAGES})()) !== JSON.stringify(before)",
                               arg=before, timeout=120_000, polling=500)
        page.wait_for_function(ALL_RAN, timeout=120_000, polling=500)
        after = page.evaluate(WIDGET_IMAGES)
        value_after = box.locator(".widget-readout").inner_text()
        page.screenshot(path=str(SHOTS / f"{stem}_after.png"))
        assert value_after != value_before, f"{notebook}: the {slider!r} slider did not move ({value_before})"
        assert after != before and all(src.startswith("data:image/png") for src in after), \
            f"{notebook}: moving {slider!r} from {value_before} to {value_after} did not change the picture"
        assert page.evaluate(ERRORS) == [], f"{notebook}: an error after moving {slider!r}"
    except Exception:
        page.screenshot(path=str(SHOTS / f"{stem}_failed.png"), full_page=True)
        raise
    finally:
        page.evaluate(f"{APP} && {APP}.sessionContext.shutdown()")     # free the CPU for the next notebook
        page.close()
