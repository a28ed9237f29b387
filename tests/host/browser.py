"""The real ComfyUI frontend in a headless Chromium, for the browser tests: the system's `chromium` driven by
Python playwright (no browser is downloaded), pointed at a running test server."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator

# Without the networking flags Chromium keeps calling Google's services, which a closed network refuses.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1600, "height": 1000}
TITLE_HEIGHT = 30  # LiteGraph's node title bar, above `pos`; getBounding() includes it

# Failed loads the frontend makes on every start and that have nothing to do with a custom node pack: optional files
# a user may add (user.css, userdata files), settings never saved on a fresh server (404 until set), and calls to
# Comfy's servers for release notes and templates, which a closed network refuses.
UNRELATED_FAILED_URLS = ("/user.css", "/api/userdata/", "/api/settings/", "https://api.comfy.org/")


def chromium_path() -> str | None:
    """The system Chromium (CUSTVID_CHROMIUM overrides), or None."""
    path = os.environ.get("CUSTVID_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    return path if path and os.access(path, os.X_OK) else None


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    if chromium_path() is None:
        return "no chromium on PATH or at CUSTVID_CHROMIUM (Debian: apt-get install chromium)"
    return None


class Frontend:
    """A page of the ComfyUI frontend and what it logged."""

    def __init__(self, page, server):
        self.page, self.server = page, server
        self.errors: list[str] = []  # console errors and uncaught exceptions, unrelated failed loads left out
        self.failed_urls: set[str] = set()
        page.on("requestfailed", lambda r: self.failed_urls.add(r.url))
        page.on("response", lambda r: r.status >= 400 and self.failed_urls.add(r.url))
        page.on("console", self._console)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def _console(self, message) -> None:
        if message.type != "error":
            return
        url = (message.location or {}).get("url", "")
        if message.text.startswith("Failed to load resource") and unrelated_url(url):
            return
        self.errors.append(f"{message.text} ({url})" if url else message.text)

    def load(self, workflow: dict) -> dict:
        """Load a UI-format workflow as opening its file does. Returns the graph as the frontend holds it:
        nodes (id, type, pos, size, bounding with title bar, widgets as [name, value]), the view (offset,
        scale), the canvas area left free by the sidebar and top bars, and the dialogs shown."""
        self.close_dialogs()
        self.page.evaluate("async (wf) => { await window.app.loadGraphData(wf) }", workflow)
        self.page.wait_for_timeout(500)  # dialogs open on the next frames
        return self.page.evaluate(READ_GRAPH)

    def close_dialogs(self) -> None:
        for _ in range(3):
            if not self.page.evaluate("() => document.querySelectorAll('.p-dialog').length"):
                return
            self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(200)

    def run_button(self):
        return self.page.locator('button[aria-label="Run"]')


READ_GRAPH = """() => {
  const app = window.app, ds = app.canvas.ds;
  const rect = (sel) => { const e = document.querySelector(sel); return e ? e.getBoundingClientRect() : null; };
  const sidebar = rect('.side-tool-bar-container'), menu = rect('.p-breadcrumb') || rect('.workflow-tabs-container');
  return {
    nodes: app.graph.nodes.map(n => ({
      id: n.id, type: n.type, pos: [...n.pos], size: [...n.size], bounding: Array.from(n.getBounding()),
      widgets: (n.widgets || []).map(w => [w.name, w.value === undefined ? null : w.value, w.value === undefined]),
      saved: n.serialize().widgets_values || [],
    })),
    groups: app.graph.groups.map(g => Array.from(g._bounding || g.bounding)),
    view: {offset: [...ds.offset], scale: ds.scale},
    free_left: sidebar ? sidebar.right : 0, free_top: menu ? menu.bottom : 0,
    dialogs: Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText),
  };
}"""


def unrelated_url(url: str) -> bool:
    return "custvid" not in url.lower() and any(part in url for part in UNRELATED_FAILED_URLS)


@contextmanager
def frontend(server) -> Iterator[Frontend]:
    """The server's frontend open in a fresh headless Chromium profile (first-run template browser off)."""
    import requests
    from playwright.sync_api import sync_playwright

    requests.post(server.url + "/settings/Comfy.TutorialCompleted", json=True, timeout=30).raise_for_status()
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        context = p.chromium.launch_persistent_context(profile, executable_path=chromium_path(), headless=True,
                                                       args=CHROMIUM_ARGS, viewport=VIEWPORT)
        try:
            page = context.new_page()
            ui = Frontend(page, server)
            page.goto(server.url)
            page.wait_for_function("() => window.app?.graph && window.app.canvas && "
                                   "document.querySelector('button[aria-label=\"Run\"]')", timeout=120_000)
            yield ui
        finally:
            context.close()


def overlaps(a: list[float], b: list[float]) -> bool:
    """Whether two [x, y, w, h] rectangles share area."""
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]
