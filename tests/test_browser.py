"""End-to-end: the OutlierExplorer in a real browser (JupyterLab 4 and Notebook 7).

Starts a Jupyter server on a free localhost port (known token, root at the repository, no
browser), opens ``notebooks/01_attention_outliers.ipynb`` in headless Chromium through
Playwright (the system's ``chromium``; Playwright downloads nothing), runs all cells from the
Run menu, waits for the OutlierExplorer to render, moves its layer slider with the keyboard
and checks that the plotly heatmap's data and the slider's readout changed. A screenshot of
the explorer goes to ``test-artifacts/browser_explorer.png`` (``browser_explorer_nb7.png`` for
Notebook 7).

Skipped when chromium is missing, unless the environment variable ``CI`` is set: then it fails.
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
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
NOTEBOOK = "notebooks/01_attention_outliers.ipynb"
TOKEN = "sfp-browser-test"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
RENDER_TIMEOUT_MS = 300_000  # all cells, including building the synthetic model


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _require_chromium() -> str:
    path = _chromium()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed but CI is set: install it "
                        "(apt-get install -y chromium) before running the tests")
        pytest.skip("chromium is not installed (apt-get install -y chromium); "
                    "set CI=1 to make this a failure")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("the playwright Python package is missing (pip install playwright)")
        pytest.skip("the playwright Python package is missing")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def jupyter_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Jupyter server (JupyterLab 4 + Notebook 7 frontends) on localhost; yields its URL."""
    _require_chromium()
    port = _free_port()
    home = tmp_path_factory.mktemp("jupyter")
    settings = home / "settings" / "@jupyterlab"
    (settings / "apputils-extension").mkdir(parents=True)
    (settings / "docmanager-extension").mkdir(parents=True)
    # no news / update-check pop-ups; no autosave (the notebooks are committed without outputs)
    (settings / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    (settings / "docmanager-extension" / "plugin.jupyterlab-settings").write_text(
        json.dumps({"autosave": False})
    )
    env = dict(os.environ, SFP_FAST="1", JUPYTER_RUNTIME_DIR=str(home / "runtime"),
               JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
               JUPYTERLAB_SETTINGS_DIR=str(home / "settings"))
    original = (ROOT / NOTEBOOK).read_bytes()
    log = open(home / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}",
         "--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.root_dir={ROOT}", f"--IdentityProvider.token={TOKEN}",
         f"--LabApp.user_settings_dir={home / 'settings'}",
         f"--LabApp.workspaces_dir={home / 'workspaces'}",
         "--ServerApp.allow_root=True", "--LabApp.extension_manager=readonly"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    log.flush()
                    raise RuntimeError("Jupyter server did not start:\n"
                                       + (home / "server.log").read_text()[-3000:]) from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        if (ROOT / NOTEBOOK).read_bytes() != original:  # never leave outputs behind
            (ROOT / NOTEBOOK).write_bytes(original)


_HEATMAP_JS = """
() => {
  const root = document.querySelector('.sfp-outlier-explorer');
  if (!root) return null;
  const gd = root.querySelector('.js-plotly-plot');
  if (!gd || !gd.data) return null;
  const t = gd.data.find(d => d.meta === 'map');
  if (!t || !t.z) return null;
  const toArr = v => (v !== null && typeof v === 'object' && 'length' in v)
    ? Array.from(v, toArr) : v;
  const title = gd.layout && gd.layout.title ? (gd.layout.title.text || '') : '';
  return JSON.stringify({z: toArr(t.z), title: title});
}
"""


_ALL_DONE_JS = """
() => {
  // prompts of the notebook on show (a tab restored from an earlier test stays hidden)
  const prompts = Array.from(document.querySelectorAll('.jp-CodeCell .jp-InputPrompt'))
    .filter(p => !p.closest('.lm-mod-hidden'));
  if (prompts.length === 0) return false;
  const texts = prompts.map(p => p.textContent.trim());
  return texts.every(t => /^\\[\\d+\\]:?$/.test(t));
}
"""


def _shutdown_sessions(url: str) -> None:
    """Stop every kernel session, so each test starts from a fresh kernel."""
    req = urllib.request.Request(f"{url}/api/sessions?token={TOKEN}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        sessions = json.loads(resp.read())
    for s in sessions:
        urllib.request.urlopen(urllib.request.Request(
            f"{url}/api/sessions/{s['id']}?token={TOKEN}", method="DELETE"), timeout=10)


def _run_explorer(url: str, page_path: str, screenshot: Path) -> dict:
    """Open the notebook, run all cells, move the explorer's layer slider; return what changed."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_require_chromium(), headless=True,
                                     args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1500, "height": 1000})
            page = context.new_page()
            page.goto(f"{url}/{page_path}?token={TOKEN}", wait_until="domcontentloaded")
            # the notebook panel and its kernel
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
            time.sleep(3)  # let the kernel start; execution requests queue until it is ready
            page.get_by_role("menuitem", name="Run", exact=True).first.click()
            page.get_by_text("Run All Cells", exact=True).first.click()
            page.wait_for_function(_HEATMAP_JS, timeout=RENDER_TIMEOUT_MS, polling=1000)
            # every cell has run (no "[*]" left): the kernel is free to answer the slider
            page.wait_for_function(_ALL_DONE_JS, timeout=RENDER_TIMEOUT_MS, polling=1000)
            explorer = page.locator(".sfp-outlier-explorer").first
            explorer.scroll_into_view_if_needed()
            time.sleep(1)
            before = json.loads(page.evaluate(_HEATMAP_JS))
            readout = explorer.locator(".widget-readout").first
            value_before = readout.inner_text().strip()
            changed = (f"() => {{ const s = ({_HEATMAP_JS})(); return s !== null && "
                       f"JSON.parse(s).title !== {json.dumps(before['title'])}; }}")
            handle = explorer.locator(".noUi-handle").first
            handle.click()
            handle.press("ArrowLeft")  # keyboard first (noUiSlider's keyboard support)
            method = "keyboard"
            time.sleep(3)
            if readout.inner_text().strip() == value_before:
                # this frontend swallowed the arrow key: drag the handle one step left instead
                method = "mouse drag"
                track = explorer.locator(".noUi-target").first.bounding_box()
                box = handle.bounding_box()
                assert track is not None and box is not None
                lo, hi = (int(v) for v in page.evaluate(
                    "() => { const s = document.querySelector('.sfp-outlier-explorer "
                    ".noUi-target').noUiSlider; return s.options.range ? "
                    "[s.options.range.min, s.options.range.max] : [1, 12]; }"))
                step = track["width"] / max(1, hi - lo)
                x0, y0 = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
                page.mouse.move(x0, y0)
                page.mouse.down()
                page.mouse.move(x0 - step, y0, steps=8)
                page.mouse.up()
            # the kernel answers: new heatmap and title
            page.wait_for_function(changed, timeout=120_000, polling=500)
            after = json.loads(page.evaluate(_HEATMAP_JS))
            value_after = readout.inner_text().strip()
            time.sleep(1)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            explorer.screenshot(path=str(screenshot))
            print(f"{page_path}: layer {value_before} -> {value_after} by {method}")
            return {"before": before, "after": after, "value_before": value_before,
                    "value_after": value_after, "method": method}
        except Exception:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot.with_name(screenshot.stem + "_failure.png")),
                            full_page=True)
            raise
        finally:
            browser.close()


def _check(result: dict) -> None:
    before, after = result["before"], result["after"]
    assert result["value_before"].isdigit() and result["value_after"].isdigit()
    assert int(result["value_after"]) < int(result["value_before"])
    assert f"layer {result['value_before']}:" in before["title"]
    assert f"layer {result['value_after']}:" in after["title"]
    assert "synthetic (planted outliers)" in after["title"]
    assert before["z"] != after["z"], "the heatmap did not change"
    assert len(after["z"]) == 14 and all(len(row) == 14 for row in after["z"])


def test_explorer_in_jupyterlab(jupyter_server: str) -> None:
    _shutdown_sessions(jupyter_server)
    result = _run_explorer(jupyter_server, f"lab/tree/{NOTEBOOK}",
                           ARTIFACTS / "browser_explorer.png")
    _check(result)


def test_explorer_in_notebook7(jupyter_server: str) -> None:
    _shutdown_sessions(jupyter_server)
    result = _run_explorer(jupyter_server, f"notebooks/{NOTEBOOK}",
                           ARTIFACTS / "browser_explorer_nb7.png")
    _check(result)


_PAGE_JS = """
() => {
  const divs = Array.from(document.querySelectorAll('div.sfp-plot'));
  const out = [];
  for (const d of divs) {
    const title = d.querySelector('.gtitle');
    const bar = d.querySelector('.modebar');
    const box = d.getBoundingClientRect();
    const t = title ? title.getBoundingClientRect() : null;
    const m = bar ? bar.getBoundingClientRect() : null;
    out.push({drawn: !d.classList.contains('pending') && !!d.querySelector('.main-svg'),
              top: box.top, left: box.left, right: box.left + (d.data ? d.layout.width : 0),
              titleTop: t ? t.top : null, titleBottom: t ? t.bottom : null,
              titleRight: t ? t.right : null, titleLeft: t ? t.left : null,
              barBottom: m ? m.bottom : null, barLeft: m ? m.left : null,
              heatmaps: d.data ? d.data.filter(x => x.type === 'heatmap').length : 0});
  }
  return out;
}
"""


def test_interactive_page_in_chromium(tmp_path: Path) -> None:
    """The compressed interactive page (plotly.js inflated by the browser) draws every figure
    as it scrolls into view, and no title line sits under plotly's tool bar."""
    from playwright.sync_api import sync_playwright

    from sfp.core.io import normalize
    from sfp.core.probe import record
    from sfp.models.synthetic import planted_model, synthetic_scene
    from sfp.viz.figures import (
        norm_maps_plotly,
        outlier_grid_plotly,
        propagation_data,
        propagation_plotly,
    )
    from sfp.viz.figures.export import write_plotly_page

    chromium = _require_chromium()
    bundle, _ = planted_model("ViT-S-16", seed=0)
    scene = synthetic_scene(0)
    trace = record(bundle, normalize(scene, bundle)[None])
    rgb = scene.permute(1, 2, 0).numpy()
    pd = propagation_data(trace, rgb)
    figs = [("Outlier grid", outlier_grid_plotly(trace, rgb, layers=[2, 6, 7, 12])),
            ("Propagation", propagation_plotly(pd)), ("Norm maps", norm_maps_plotly(pd))]
    page_path = write_plotly_page(tmp_path / "interactive.html", figs, title="figures",
                                  banner=bundle.label, synthetic=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.goto(page_path.as_uri())
            page.wait_for_selector("div.sfp-plot .main-svg", timeout=60_000)
            for div in page.locator("div.sfp-plot").all():  # lazy: drawn when near the view
                div.scroll_into_view_if_needed()
                page.wait_for_timeout(300)
            page.wait_for_function("() => !document.querySelector('div.sfp-plot.pending')",
                                   timeout=60_000)
            page.wait_for_timeout(500)
            info = page.evaluate(_PAGE_JS)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.evaluate("() => window.scrollTo(0, 0)")
            page.screenshot(path=str(ARTIFACTS / "browser_interactive_page.png"))
        finally:
            browser.close()
    assert [i["drawn"] for i in info] == [True, True, True]
    assert info[0]["heatmaps"] == 7 * 4  # 7 rows x 4 layers of heatmaps
    for i in info:
        assert i["titleTop"] is not None and i["titleTop"] >= i["top"]  # not cut off
        assert i["left"] <= i["titleLeft"] and i["titleRight"] <= i["right"]  # nor its sides
        overlaps = i["barBottom"] is not None and i["titleTop"] < i["barBottom"] \
            and i["titleRight"] > i["barLeft"]
        assert not overlaps, i


NEURON_NOTEBOOK = "notebooks/04_where_outliers_come_from.ipynb"

_NEURON_NORMS_JS = """
() => {
  const root = document.querySelector('.sfp-neuron-view');
  if (!root) return null;
  const gd = root.querySelector('.js-plotly-plot');
  if (!gd || !gd.data) return null;
  const t = gd.data.find(d => d.meta === 'norm');
  if (!t || !t.z) return null;
  const toArr = v => (v !== null && typeof v === 'object' && 'length' in v)
    ? Array.from(v, toArr) : v;
  const z = toArr(t.z).flat();
  if (z.length < 4 || z.every(v => v === 0)) return null;
  const sorted = [...z].sort((a, b) => a - b);
  return Math.max(...z) / sorted[Math.floor(sorted.length / 2)];
}
"""


def test_neuron_view_in_jupyterlab(jupyter_server: str) -> None:
    """NeuronView reacts in the browser: zeroing the register neurons removes the outliers
    from the norm map (max / median patch norm from > 10 to < 2)."""
    from playwright.sync_api import sync_playwright

    _shutdown_sessions(jupyter_server)
    original = (ROOT / NEURON_NOTEBOOK).read_bytes()
    screenshot = ARTIFACTS / "browser_neuron_view.png"
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=_require_chromium(), headless=True,
                                         args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            try:
                page.goto(f"{jupyter_server}/lab/tree/{NEURON_NOTEBOOK}?token={TOKEN}&reset",
                          wait_until="domcontentloaded")
                page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
                time.sleep(3)
                page.get_by_role("menuitem", name="Run", exact=True).first.click()
                page.get_by_text("Run All Cells", exact=True).first.click()
                # every cell has run; then bring the view on screen (JupyterLab may skip
                # drawing cells outside the window) and wait for its norm map
                page.wait_for_function(_ALL_DONE_JS, timeout=RENDER_TIMEOUT_MS, polling=1000)
                view = page.locator(".sfp-neuron-view").first
                view.wait_for(state="attached", timeout=RENDER_TIMEOUT_MS)
                view.scroll_into_view_if_needed()
                page.wait_for_function(_NEURON_NORMS_JS, timeout=120_000, polling=1000)
                before = page.evaluate(_NEURON_NORMS_JS)
                view.get_by_role("button", name="register neurons zeroed").click()
                page.wait_for_function(f"() => {{ const r = ({_NEURON_NORMS_JS})(); "
                                       "return r !== null && r < 2; }", timeout=120_000,
                                       polling=500)
                after = page.evaluate(_NEURON_NORMS_JS)
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                view.screenshot(path=str(screenshot))
            except Exception:
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot.with_name(screenshot.stem + "_failure.png")),
                                full_page=True)
                raise
            finally:
                browser.close()
    finally:
        if (ROOT / NEURON_NOTEBOOK).read_bytes() != original:
            (ROOT / NEURON_NOTEBOOK).write_bytes(original)
    assert before > 10 and after < 2, (before, after)
