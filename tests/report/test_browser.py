"""``report.html`` in a real browser: every image loads, tables are there, no errors.

Needs Debian's ``chromium`` (CI installs it in .ci/run); skipped elsewhere with the
reason, but never on CI (``CI`` set), where a missing browser is a failure.
"""

from __future__ import annotations

import os
import shutil

import pytest

from .browser import chromium, inspect_page


@pytest.fixture(scope="module")
def browser_ready():
    if chromium() is None:
        message = ("chromium is not installed (apt-get install chromium); CI installs it, "
                   "see .ci/run")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    pytest.importorskip("websocket", reason="websocket-client (pip install -e '.[test]')")


def test_report_html_in_headless_chromium(browser_ready, full_report, tmp_path):
    shot = tmp_path / "report.png"
    seen = inspect_page(full_report.html, tmp_path / "profile", screenshot=shot)
    images = seen["images"]
    assert len(images) == len(full_report.plots) == 7
    for image in images:
        assert image["src"].startswith("data:image/png"), image
        assert image["complete"] and image["width"] > 0 and image["height"] > 0, image
    assert seen["tables"] >= 10
    assert {"At a glance", "Plots", "Quality", "What was measured and how",
            "Results per resolution", "Points not measured", "Published numbers"} <= set(
        seen["headings"])
    assert seen["console_errors"] == [] and seen["exceptions"] == []
    # self-contained: the page itself is the only thing loaded (data: URIs are no requests)
    loaded = [url for url in seen["requests"] if not url.startswith("data:")]
    assert loaded == [full_report.html.resolve().as_uri()[:40]], seen["requests"]
    assert shot.stat().st_size > 50_000
    keep = os.environ.get("ATTNBENCH_SCREENSHOT_DIR")  # to look at it yourself
    if keep:
        os.makedirs(keep, exist_ok=True)
        shutil.copy(shot, os.path.join(keep, "report.png"))
