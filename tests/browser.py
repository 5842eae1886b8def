"""Headless Chromium driven by selenium, for testing HTML pages (the network is closed).

Debian's chromium and chromium-driver are installed when missing (root and apt-get needed).
"""

from __future__ import annotations

import os
import shutil
import subprocess

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--window-size=1200,900",
)


def install() -> None:
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    command = ["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"]
    if subprocess.run(command, env=env, capture_output=True).returncode != 0:
        # An install killed midway (a test's timeout) leaves dpkg "interrupted", refusing every
        # later install until it is finished.
        subprocess.run(["dpkg", "--configure", "-a"], env=env, capture_output=True)
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=True)
        subprocess.run(command, env=env, capture_output=True, check=True)


def chromium():
    """A selenium WebDriver on headless Chromium that keeps the browser console log."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    install()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
