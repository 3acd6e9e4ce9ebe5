"""index.html as a browser sees it: headless Chromium's DOM has the tables with the expected numbers, and its
screenshot shows the page (not blank) with the figures drawn from their data URIs.

Chromium: `apt-get install -y chromium` (Debian); .ci/run installs it when missing and sets
SOARBENCH_REQUIRE_BROWSER=1, so in CI a missing browser fails this test instead of skipping it. Elsewhere the test
skips without a browser; SOARBENCH_CHROMIUM names a binary outside PATH.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from soarbench.report import write_report
from test_report_paper import STEP, write_paper_experiment

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Okabe-Ito blue, the first trained group's colour in every figure
FIGURE_BLUE = (0x00, 0x72, 0xB2)


def _chromium() -> str:
    found = os.environ.get("SOARBENCH_CHROMIUM") or next((b for b in BROWSERS if shutil.which(b)), None)
    if found is None:
        if os.environ.get("SOARBENCH_REQUIRE_BROWSER") == "1":
            pytest.fail("SOARBENCH_REQUIRE_BROWSER=1 but no chromium on PATH (apt-get install -y chromium)")
        pytest.skip("no chromium on PATH (apt-get install -y chromium); CI installs it")
    return found


def _run(browser: str, *args: str) -> subprocess.CompletedProcess:
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


class _Tables(HTMLParser):
    """Rows of cell texts of every <table id=...> in a DOM dump."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and attrs.get("id"):
            self._table = self.tables.setdefault(attrs["id"], [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag in ("td", "th") and self._cell is not None:
            self._table[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    browser = _chromium()
    root = tmp_path_factory.mktemp("browser")
    page = write_report([write_paper_experiment(root / "exp")], root / "out", formats=["html"])["html"]
    dom = _run(browser, "--dump-dom", page.resolve().as_uri()).stdout
    shot = root / "shot.png"
    _run(browser, "--window-size=1280,4000", f"--screenshot={shot}", page.resolve().as_uri())
    return dom, shot


def test_dom_has_the_paper_table_with_the_expected_numbers(rendered):
    dom, _ = rendered
    parser = _Tables()
    parser.feed(dom)
    rows = {r[0]: r for r in parser.tables["paper-table"] if r}
    header = parser.tables["paper-table"][0]
    assert header[3] == "GenEval ↑paper" and header[4] == "OCR ↑official · rapidocr-3.10.0"
    assert rows[f"soar@{STEP}"][1:4] == [str(STEP), "2", "0.720 [0.700, 0.740]"]
    assert rows[f"sft@{STEP}"][4] == "0.520 [0.500, 0.540]"
    assert rows["base"][5] == "21.50"
    assert rows["SD3.5-M + SOAR"][3:10] == ["0.780", "0.670", "22.86", "0.295", "0.289", "5.46", "1.09"]
    blocks = [r[0] for r in parser.tables["paper-table"] if len(r) == 1]
    assert blocks == ["measured (this report)", "published (papers' numbers, 'paper' protocol)"]
    comparisons = parser.tables["comparisons"]
    soar_geneval = next(r for r in comparisons if r[:3] == ["geneval", f"soar@{STEP}", "SD3.5-M + SOAR"])
    assert soar_geneval[3] == "-0.060"
    assert "<strong>0.720</strong>" in dom  # the best measured GenEval is bold


def test_screenshot_is_not_blank_and_shows_the_figures(rendered):
    _, shot = rendered
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (4000, 1280)
    background = np.array([0xFA, 0xFA, 0xFA])
    drawn = np.abs(pixels - background).sum(axis=2) > 30
    assert drawn.mean() > 0.05  # text, tables and figures, not an empty page
    # the figures' lines: pixels of the first group's colour appear only where a PNG figure was decoded
    blue = (np.abs(pixels - np.array(FIGURE_BLUE)).sum(axis=2) < 40).sum()
    assert blue > 100
