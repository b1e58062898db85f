"""A headless Chromium for the playground's browser tests and screenshots (tests/test_playground_browser.py,
``python -m harness.screenshots``): Debian's ``chromium`` driven through its ``chromedriver`` by selenium.

Both paths are given to selenium, so its Selenium Manager never tries to download a browser or a driver
(nothing may be downloaded at run time). ``missing_reason()`` says why no browser can be started, for a test
to skip with.
"""

from __future__ import annotations

import os
import shutil

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver",)


def _which(names: tuple[str, ...], variable: str) -> str | None:
    if os.environ.get(variable):
        return os.environ[variable]
    return next((path for path in map(shutil.which, names) if path), None)


def browser_path() -> str | None:
    return _which(BROWSERS, "NNSERVE_CHROMIUM")


def driver_path() -> str | None:
    # Debian installs chromium-driver's binary outside PATH on some releases.
    return _which(DRIVERS, "NNSERVE_CHROMEDRIVER") or next(
        (p for p in ("/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver") if os.path.exists(p)), None)


def missing_reason() -> str | None:
    """None when a headless Chromium can be started here, else why not (and how to install it)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    if browser_path() is None:
        return "no Chromium on PATH (apt-get install chromium chromium-driver, or set NNSERVE_CHROMIUM)"
    if driver_path() is None:
        return "no chromedriver (apt-get install chromium-driver, or set NNSERVE_CHROMEDRIVER)"
    return None


def chromium(width: int = 1280, height: int = 900):
    """A new headless Chromium WebDriver (the caller quits it). Its JavaScript console is kept for
    ``driver.get_log("browser")`` (CSP violations and script errors show up there)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = browser_path(), driver_path()
    if browser is None or driver is None:  # callers check missing_reason() first; say why if one did not
        raise RuntimeError(f"cannot start a headless Chromium: {missing_reason()}")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--no-first-run", "--disable-extensions", "--disable-background-networking",
                     f"--window-size={width},{height}", "--hide-scrollbars"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))
