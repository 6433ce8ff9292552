"""Debian's Chromium, headless, driven by Playwright for Python; the page and the files it fetches come from
a FolderServer on 127.0.0.1 whose responses carry the cross-origin isolation headers WASM threads need.

Playwright's own browser downloads are never used: the executable is Debian's `chromium` package
(or $EVSAM_CHROMIUM). Playwright's sync API allows one driver per thread, so the pages of one thread share
a driver (started with the first page, stopped with the last); each page has its own browser process.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from urllib.parse import urlencode

from evsam_export.runners.base import Availability
from evsam_export.web.dist import dist_version, find_dist, missing_reason

ASSETS = Path(__file__).parent.parent / "web" / "assets"
RUNNER_PAGE = "/__evsam__/runner.html"
CHROMIUM_ENV_VAR = "EVSAM_CHROMIUM"
CHROMIUM_INSTALL = "apt-get install -y chromium"
PLAYWRIGHT_INSTALL = "pip install playwright (its browser downloads are not needed)"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Seconds a page may take to start onnxruntime-web or to answer one call (a 1024-px encoder on one thread).
TIMEOUT_S = 600


def chromium_executable() -> Path | None:
    if os.environ.get(CHROMIUM_ENV_VAR):
        given = Path(os.environ[CHROMIUM_ENV_VAR]).expanduser()
        return given if given.is_file() else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return Path(found)
    return None


def browser_availability() -> Availability:
    """Whether a browser runner can start here: Playwright, Chromium and onnxruntime-web, each with its fix."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return Availability(False, f"Playwright for Python is not installed ({PLAYWRIGHT_INSTALL})")
    if chromium_executable() is None:
        where = f"${CHROMIUM_ENV_VAR}={os.environ[CHROMIUM_ENV_VAR]}" if os.environ.get(CHROMIUM_ENV_VAR) else "PATH"
        return Availability(False, f"no chromium executable on {where} ({CHROMIUM_INSTALL})")
    dist = find_dist()
    if dist is None:
        return Availability(False, missing_reason())
    return Availability(True, version=dist_version(dist))



class BrowserError(RuntimeError):
    """onnxruntime-web or the page failed; the message is the page's own error line."""


def _first_line(message) -> str:
    """The first line of a Playwright error without its "Page.evaluate: Error: " prefixes."""
    lines = str(message or "").strip().splitlines()
    return lines[0].removeprefix("Page.evaluate: ").removeprefix("Error: ") if lines else "unknown error in the browser"


_driver_lock = threading.Lock()
_drivers: dict[int, list] = {}  # thread id -> [playwright, pages using it]


def _acquire_driver():
    from playwright.sync_api import sync_playwright

    with _driver_lock:
        entry = _drivers.get(threading.get_ident())
        if entry is None:
            entry = _drivers[threading.get_ident()] = [sync_playwright().start(), 0]
        entry[1] += 1
        return entry[0]


def _release_driver() -> None:
    with _driver_lock:
        entry = _drivers.get(threading.get_ident())
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _drivers[threading.get_ident()]
            entry[0].stop()


class BrowserPage:
    """One headless Chromium holding one runner page; `mounts` maps URL prefixes ("/ort-web/") to folders,
    served (files inside them only) by this page's own FolderServer."""

    def __init__(self, mounts: dict[str, Path], query: dict[str, str | int]) -> None:
        self.mounts = {**mounts, "/__evsam__/": ASSETS}
        self.query = dict(query)
        self._server = self._driver = self._browser = self.page = None

    @property
    def blobs(self) -> dict[str, bytes]:
        """Raw tensor bytes exchanged with the page (web.server.BLOB_PREFIX)."""
        return self._server.blobs

    def open(self) -> BrowserPage:
        from playwright.sync_api import Error as PlaywrightError

        from evsam_export.web.server import FolderServer

        try:
            self._server = FolderServer(self.mounts)
            self._driver = _acquire_driver()
            self._browser = self._driver.chromium.launch(executable_path=str(chromium_executable()), args=CHROMIUM_ARGS,
                                                         headless=True)
            self.page = self._browser.new_page()
            self.page.set_default_timeout(TIMEOUT_S * 1000)
            self.page.goto(f"{self._server.origin}{RUNNER_PAGE}?{urlencode(self.query)}")
            self.page.wait_for_function("window.evsam !== undefined || window.evsamError !== undefined")
            failure = self.page.evaluate("window.evsamError || ''")
            if failure:
                raise BrowserError(f"onnxruntime-web did not start in the page: {failure}")
        except PlaywrightError as error:  # Chromium did not launch, or the page timed out
            self.close()
            raise BrowserError(_first_line(error.message)) from error
        except BaseException:
            self.close()
            raise
        return self

    def call(self, expression: str, argument=None):
        """page.evaluate(expression, argument), a failure in the page raised as one BrowserError line."""
        from playwright.sync_api import Error as PlaywrightError

        try:
            return self.page.evaluate(expression, argument)
        except PlaywrightError as error:
            raise BrowserError(_first_line(error.message)) from error

    def close(self) -> None:
        if self._browser is not None:
            try:
                self._browser.close()
            except Exception:  # noqa: BLE001 - closing a browser that already died must not hide the first error
                pass
        if self._driver is not None:
            _release_driver()
        if self._server is not None:
            self._server.close()
        self._server = self._driver = self._browser = self.page = None
