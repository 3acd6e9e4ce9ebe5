"""index.html as a browser sees it: headless Chromium's DOM has the tables with the expected numbers, and its
screenshot shows the page (not blank) with the figures drawn from their data URIs.

Chromium: `apt-get install -y chromium` (Debian); .ci/run installs it when missing and sets
SOARBENCH_REQUIRE_BROWSER=1, so in CI a missing browser fails this test instead of skipping it. Elsewhere the test
skips without a browser; SOARBENCH_CHROMIUM names a binary outside PATH.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

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
    # a published value stands only beside a measured column of the same benchmark and protocol: GenEval ran under
    # the papers' protocol here, the other columns under the official one
    assert rows["SD3.5-M + SOAR"][3:10] == ["0.780", "", "", "", "", "", ""]
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


# ---------------------------------------------------------------------------------------------------------------
# A shapes-world report as `soarbench run` leaves it, at the page width the report is laid out for

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
PROMPTS = ("a photo of a red circle", "a photo of two blue squares", "a photo of three green triangles",
           "a photo of a yellow cross", "a photo of a circle left of a square", "a photo of a red square and a "
           "blue circle", "a photo of a purple triangle", "a photo of four circles")
GROUPS = {"base": "base", "sft": "sft", "soar": "soar", "flow_grpo": "flow_grpo"}
COLORS = {"base": (120, 120, 120), "sft": (0, 114, 178), "soar": (213, 94, 0), "flow_grpo": (0, 158, 115)}


def _shapes_eval(run_dir, run, group, seed, step, rng):
    folder = run_dir / "evals" / f"step_{step:06d}" / "shapes"
    (folder / "images").mkdir(parents=True)
    samples, per_prompt = [], []
    for p, prompt in enumerate(PROMPTS):
        hits = []
        for i in range(2):
            name = f"images/{p:05d}_{i}.png"
            img = np.full((32, 32, 3), COLORS[group], dtype=np.uint8)
            img[8:24, 4 + 2 * p:20 + 2 * p] = 255
            Image.fromarray(img).save(folder / name)
            hit = float(rng.random() < 0.3 + 0.05 * len(group))
            hits.append(hit)
            samples.append({"id": f"{p:05d}_{i}", "prompt_index": p, "image_index": i, "seed": 100 * p + i,
                            "prompt": prompt, "file": name, "tag": TASKS[p % 6],
                            "records": {"geneval": {"score": hit}}})
        per_prompt.append(float(np.mean(hits)))
    (folder / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    scores = {"geneval": float(np.mean(per_prompt))}
    scores.update({f"geneval/{t}": float(np.mean([v for q, v in enumerate(per_prompt) if q % 6 == k]))
                   for k, t in enumerate(TASKS)})
    doc = {
        "schema": "soarbench.eval/1",
        "model": {"run_name": run, "group": group, "method": GROUPS[group], "seed": seed, "step": step,
                  "path": str(run_dir / "ckpt"),
                  "budget_spent": {"fwd_bwd_equiv": 40.0 * step, "fwd_bwd": 30 * step, "images": 16 * step,
                                   "no_grad_fwd": 30 * step, "reward_calls": 4 * step, "optimizer_steps": step,
                                   "unique_prompts": step, "wall_s": 2.0 * step}},
        "benchmark": {"name": "shapes", "n_prompts": len(PROMPTS), "images_per_prompt": 2,
                      "prompt_set_sha256": "ab" * 32},
        "scores": scores,
        "per_prompt": {"geneval": per_prompt},
        "per_prompt_tags": {"geneval": [TASKS[p % 6] for p in range(len(PROMPTS))]},
        "metrics": {"geneval": {"name": "geneval", "version": "shapes-1", "scale": "accuracy in [0, 1]",
                                "higher_is_better": True}},
        "n_samples": 2 * len(PROMPTS),
        "provenance": {"git_sha": "0123abcd", "git_dirty": False,
                       "resolved_config": {"budget": {"unit": "fwd_bwd_equiv"}}},
    }
    (folder / "summary.json").write_text(json.dumps(doc))


def write_shapes_experiment(root: Path) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    # the controls table's long findings are one line each (nowrap): it must scroll in its box, not the page
    (root / "experiment.toml").write_text('[experiment]\nname = "shapes"\n'
                                          'controls = { positive = "flow_grpo" }\n')
    _shapes_eval(root / "base", "base", "base", 0, 0, rng)
    for group in ("sft", "soar", "flow_grpo"):
        for seed in (0, 1):
            run = f"{group}-s{seed}"
            run_dir = root / run
            run_dir.mkdir(parents=True)
            (run_dir / "run.json").write_text(json.dumps({"run_name": run, "group": group, "method": group,
                                                          "seed": seed,
                                                          "budget": {"unit": "fwd_bwd_equiv", "amount": 4000}}))
            method = f'[method]\nname = "{group}"\n' + ('rewards = { geneval = 1.0 }\n' if group == "flow_grpo"
                                                        else "")
            (run_dir / "config.toml").write_text(method)
            log = [{"step": s, "loss": 1.0 / s + 0.01 * rng.random(), "grad_norm": 1 + rng.random(), "lr": 1e-4,
                    **({"loss_main": 0.5 / s, "loss_aux": 0.7 / s} if group == "soar" else {}),
                    **({"reward_mean": 0.3 + 0.001 * s, "kl": 1e-4 * s, "clipfrac": 0.1} if group == "flow_grpo"
                       else {})} for s in range(1, 101)]
            (run_dir / "train_log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in log))
            for step in (50, 100):
                _shapes_eval(run_dir, run, group, seed, step, rng)
    return root


PAGE_WIDTH = 1400
# after layout: the document's width and, per figure, its id, class and shown / natural width
MEASURE = ("<script>document.body.setAttribute('data-measure', JSON.stringify({scrollWidth: "
           "document.documentElement.scrollWidth, figures: Array.from(document.querySelectorAll('figure')).map("
           "f => ({id: f.id, wide: f.classList.contains('wide'), shown: f.querySelector('img').clientWidth, "
           "natural: f.querySelector('img').naturalWidth}))}));</script></body>")


@pytest.fixture(scope="module")
def shapes_page(tmp_path_factory):
    browser = _chromium()
    root = tmp_path_factory.mktemp("shapes_browser")
    page = write_report([write_shapes_experiment(root / "exp")], root / "out", formats=["html"])["html"]
    probe = root / "measure.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", MEASURE), encoding="utf-8")
    dom = _run(browser, f"--window-size={PAGE_WIDTH},3000", "--dump-dom", probe.resolve().as_uri()).stdout
    measured = json.loads(re.search(r'data-measure="([^"]*)"', dom).group(1).replace("&quot;", '"'))
    shot = root / "shapes.png"
    _run(browser, f"--window-size={PAGE_WIDTH},9000", f"--screenshot={shot}", page.resolve().as_uri())
    return page, measured, shot


def test_shapes_report_fits_a_1400_px_window(shapes_page):
    """No horizontal overflow of the document: wide tables scroll inside their own box."""
    page, measured, shot = shapes_page
    assert measured["scrollWidth"] <= PAGE_WIDTH
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[1] == PAGE_WIDTH
    # the page's right padding (24 px) stays background from top to bottom: nothing runs past the column
    margin = pixels[:, PAGE_WIDTH - 20:]
    assert (np.abs(margin - np.array([0xFA, 0xFA, 0xFA])).sum(axis=2) <= 30).all()
    text = page.read_text(encoding="utf-8")
    assert 'class="data stacked"' in text  # every checkpoint: intervals under values
    assert '<h3>Controls</h3><div class="table-wrap"><table class="data controls">' in text


def test_shapes_report_shows_grids_and_signals_near_their_drawn_size(shapes_page):
    """Image grids and training signals span the page, shown at >= 95% of the size their text was drawn at (13 pt
    titles, 12 pt labels at 100 dpi): not shrunk into half a column."""
    _, measured, _ = shapes_page
    figures = {f["id"]: f for f in measured["figures"]}
    readable = [i for i in figures if i.startswith(("fig-grid_", "fig-signals_", "fig-curves_"))]
    assert {"fig-grid_methods_shapes", "fig-signals_soar", "fig-curves_shapes_geneval"} <= set(readable)
    for name in readable:
        f = figures[name]
        assert f["wide"] and f["shown"] >= 0.95 * f["natural"], f


def test_a_binary_metric_is_a_bar_with_an_interval(shapes_page):
    page, _, _ = shapes_page
    text = page.read_text(encoding="utf-8")
    caption = text.split('id="fig-distribution_shapes_geneval"', 1)[1].split("</figure>", 1)[0]
    assert "share of images scored 1" in caption and "95% bootstrap interval" in caption
    assert "quartiles" not in caption
