"""The HTML report in a real headless browser (Chromium): the page loads with no console
message and no failed resource, every image decodes, and the screenshot shows the CT and the
legend colours. Skipped where no Chromium is installed (Debian: apt-get install chromium)."""

import html
import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from autoliver import examples
from autoliver.examples.phantom import make_phantom
from autoliver.io.images import Geometry, write_image
from autoliver.report.build import build_prediction_report
from autoliver.report.html import write_report
from autoliver.report.overlays import LIVER_RGB, TUMOUR_RGB

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
PROBE = "autoliver-probe"
# Injected first in <head> of a copy of the page (the report itself has no script): records
# script errors, failed resource loads and console errors/warnings, then, once everything has
# loaded, how many images decoded, into a <pre> that --dump-dom prints.
CHECK = """<script>
window.__problems = [];
window.addEventListener('error', function (e) {
  var t = e.target;
  window.__problems.push(t && t.tagName ? 'failed to load ' + t.tagName : 'error: ' + e.message);
}, true);
['error', 'warn'].forEach(function (k) {
  var f = console[k];
  console[k] = function () { window.__problems.push(k + ': ' + Array.prototype.join.call(arguments, ' ')); f.apply(console, arguments); };
});
window.addEventListener('load', function () {
  var imgs = document.images, good = 0;
  for (var i = 0; i < imgs.length; i++) if (imgs[i].complete && imgs[i].naturalWidth > 0 && imgs[i].naturalHeight > 0) good++;
  var d = document.createElement('pre');
  d.id = 'autoliver-check';
  d.textContent = JSON.stringify({images: imgs.length, decoded: good, problems: window.__problems});
  document.body.appendChild(d);
  console.log('%s');
});
</script>""" % PROBE


def find_browser() -> str | None:
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


@pytest.fixture(scope="module")
def browser() -> str:
    found = find_browser()
    if found is None:
        pytest.skip(f"no Chromium found (looked for {', '.join(BROWSERS)}); on Debian: apt-get install chromium")
    return found


@pytest.fixture(scope="module")
def report(browser, tmp_path_factory):
    """Two cases: the real LiTS crop (its label as model and reference) and a phantom whose
    prediction misses a tumour."""
    root = tmp_path_factory.mktemp("browser")
    for sub in ("images", "pred", "ref"):
        (root / sub).mkdir()
    case = "lits117_128cube"
    shutil.copy(examples.image_path(case), root / "images" / f"{case}_0000.nii.gz")
    shutil.copy(examples.label_path(case), root / "pred" / f"{case}.nii.gz")
    shutil.copy(examples.label_path(case), root / "ref" / f"{case}.nii.gz")
    geom = Geometry((32, 64, 64), (4.0, 3.0, 3.0), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    image, label = make_phantom(geom.shape, geom.spacing, np.random.default_rng(7), n_tumours=2, tumour_radius_mm=(8.0, 12.0))
    pred = label.copy()
    pred[(pred == 2) & (np.arange(geom.shape[0])[:, None, None] < geom.shape[0] // 2)] = 1
    write_image(root / "images" / "phantom_0000.nii.gz", image, geom)
    write_image(root / "pred" / "phantom.nii.gz", pred, geom)
    write_image(root / "ref" / "phantom.nii.gz", label, geom)
    data = build_prediction_report(root / "pred", root / "images", references=root / "ref", progress=False)
    assert len(data.cases) == 2 and not data.failed
    return write_report(data, root / "report.html")


def test_report_loads_in_chromium_with_every_image(browser, report, tmp_path):
    text = report.read_text(encoding="utf-8")
    n_images = text.count("<img ")
    assert n_images >= 2 * 2 * 3  # two cases, model and reference rows, three views
    page = tmp_path / "checked.html"
    page.write_text(text.replace("<head>", "<head>" + CHECK, 1), encoding="utf-8")
    shot = tmp_path / "screenshot.png"
    cmd = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000",
           "--window-size=1280,4000", f"--screenshot={shot}", "--dump-dom", page.as_uri()]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]

    m = re.search(r'<pre id="autoliver-check">(.*?)</pre>', run.stdout, re.S)
    assert m, f"the page's load handler never ran; DOM tail: {run.stdout[-500:]}"
    check = json.loads(html.unescape(m.group(1)))
    assert check == {"images": n_images, "decoded": n_images, "problems": []}
    console = [line for line in run.stderr.splitlines() if re.search(r":CONSOLE[:(]", line)]
    assert any(PROBE in line for line in console), "console capture did not work: " + run.stderr[-1000:]
    assert [line for line in console if PROBE not in line] == []  # no message from the browser either

    from matplotlib.image import imread

    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (4000, 1280)
    assert pixels.std() > 0.15  # not blank
    rgb = np.rint(pixels * 255).astype(int)
    for colour in (LIVER_RGB, TUMOUR_RGB):  # outlines, bars and legend swatches in the legend colours
        assert np.count_nonzero(np.abs(rgb - colour).max(axis=-1) <= 8) > 500
    dark = np.count_nonzero(rgb.max(axis=-1) < 40)  # the CT's black air and the figures' frames
    assert dark > 20000
