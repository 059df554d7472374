"""The MLflow UI as a browser shows it: headless Chromium, driven by Playwright, on the pages
`stageflow ui` serves. `stageflow ui --screenshot` saves the study's runs view and a trial's
charts as PNGs, and the tests read the rendered pages through the same class."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from stageflow.platform.engine.tracking import (
    free_port,
    runs_view,
    start_ui_server,
    stop_ui_server,
    wait_for_port,
)

# lazy: playwright loads only where a page is rendered

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# Chromium on a machine without a display or outside network: no sandbox as root, no GPU, and no
# background connections (refused here, many at a time, without these flags).
FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
VIEWPORT = {"width": 1500, "height": 1000}
TIMEOUT_MS = 60_000
CHART = "[data-testid='experiment-view-compare-runs-card']"  # a metric chart's card


def missing_browser() -> str | None:
    """What rendering a page needs and this machine lacks, or None."""
    try:
        import playwright  # noqa: F401  # lazy: an optional test and screenshot dependency
    except ImportError:
        return "the playwright package (pip install playwright; `make setup` installs it)"
    if find_browser() is None:
        return "Chromium on the PATH (Debian: apt-get install chromium; `make setup` installs it)"
    return None


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


class UiPage:
    """One headless browser tab; use as a context manager."""

    def __enter__(self) -> UiPage:
        from playwright.sync_api import sync_playwright  # lazy: see above

        self._playwright = sync_playwright().start()
        self._browser = self._playwright.chromium.launch(executable_path=find_browser(), args=FLAGS)
        self.page: Any = self._browser.new_page(viewport=VIEWPORT)
        self.page.set_default_timeout(TIMEOUT_MS)
        return self

    def __exit__(self, *exc: object) -> None:
        self._browser.close()
        self._playwright.stop()

    def open_runs(self, url: str) -> list[str]:
        """Load an experiment's runs view; the names of the runs it lists."""
        self.page.goto(url)
        self.page.wait_for_selector(".ag-row")
        return self.run_names()

    def run_names(self) -> list[str]:
        names = self.page.locator(".ag-row a[href*='/runs/']").all_inner_texts()
        return [n.strip() for n in names if n.strip()]

    def expand(self, run_name: str) -> list[str]:
        """Unfold a parent run's nested runs (the button before its name); the runs listed."""
        before = len(self.run_names())
        cell = self.page.locator(".ag-row .ag-cell", has_text=run_name).first
        cell.locator("button").first.click()
        self.page.wait_for_function(
            f"document.querySelectorAll(\".ag-row a[href*='/runs/']\").length > {before}"
        )
        return self.run_names()

    def widen_names(self, pixels: int = 220) -> None:
        """Drag the run-name column's edge wider (long path names are cut short otherwise);
        the grid shows the handle on hover only."""
        header = self.page.locator(".ag-header-cell", has_text="Run Name")
        handle = header.locator(".ag-header-cell-resize").first
        handle.hover()
        box = handle.bounding_box()
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        self.page.mouse.down()
        self.page.mouse.move(x + pixels, y, steps=20)
        self.page.mouse.up()

    def run_link(self, run_name: str) -> str:
        """The address of a listed run's page."""
        link = self.page.locator(".ag-row a[href*='/runs/']", has_text=run_name).first
        return self.page.url.split("#")[0] + link.get_attribute("href")

    def open_charts(self, url: str) -> list[str]:
        """Load a run's metric charts ("Model metrics"); the metrics of the charts drawn."""
        self.page.goto(url)
        self.page.wait_for_selector(f"{CHART} .js-plotly-plot svg.main-svg")
        return self.page.locator(CHART).evaluate_all(
            "cards => cards.filter(c => c.querySelector('.js-plotly-plot svg.main-svg'))"
            ".map(c => c.querySelector('h4[title]').getAttribute('title'))"
        )

    def hide_assistant(self) -> None:
        """Close MLflow's assistant side panel, where it is open, for a screenshot."""
        close = self.page.get_by_role("button", name="Close")
        if close.count():
            close.first.click()

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path))
        return path


def screenshot_study(
    tracking_uri: str, experiment: str, study_run: str, out_dir: Path, host: str = "127.0.0.1"
) -> list[Path]:
    """`out_dir`/runs.png, the study's runs view with the study run unfolded to its trials, and
    `out_dir`/trial.png, the first trial's metric charts: rendered in headless Chromium from a
    UI server started on a free port for the purpose and ended after."""
    port = free_port(host)
    server = start_ui_server(tracking_uri, host, port, quiet=True)
    try:
        if not wait_for_port(host, port, server):
            raise RuntimeError(f"the MLflow server on {host}:{port} did not start")
        with UiPage() as ui:
            ui.open_runs(runs_view(tracking_uri, experiment, f"http://{host}:{port}"))
            names = ui.expand(study_run)
            ui.hide_assistant()
            ui.widen_names()
            shots = [ui.screenshot(out_dir / "runs.png")]
            ui.open_charts(ui.run_link(names[names.index(study_run) + 1]) + "/model-metrics")
            ui.hide_assistant()
            shots.append(ui.screenshot(out_dir / "trial.png"))
        return shots
    finally:
        stop_ui_server(server)
