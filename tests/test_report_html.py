"""The report page comes from a Jinja2 template with autoescaping: hostile case names and field
values (as a DICOM header or a folder name may hold) appear escaped, as text, in every place
the page shows them, and the page stays self-contained (no script, no external URL)."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from autoliver.report import html as report_html
from autoliver.report.build import CaseEntry, CaseSummary, Chart, ReportData, Tumour
from autoliver.report.overlays import View

SCRIPT = "<script>alert(1)</script>"
FIELD = '"><img src=x onerror=alert(1)>'
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))


class Page(HTMLParser):
    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def hostile_report(mode: str = "prediction") -> ReportData:
    views = tuple(View(name, i, 9, PNG, 32, 24) for i, name in enumerate(("axial", "coronal", "sagittal")))
    tumours = (Tumour(1, 2.5, 14.0, "medium" + FIELD),)
    summary = CaseSummary(1500.0, 2.5, 1, 2.5 / 1500.0, tumours)
    metrics = {"liver": {"dice": 0.95, "hd95_mm": 2.0}, "tumour": {"dice": float("nan"), "hd95_mm": None}, "detection": {"n_pred": 1, "n_ref": 2}}
    cases = (
        CaseEntry(SCRIPT, (("Model", views), ("Reference" + FIELD, views)), summary, summary, metrics, (9, 12, 14), (2.5, 0.8, 0.8),
                  ("Series description: " + FIELD,)),
        CaseEntry("case" + FIELD, (("Model", views),), summary),
    )
    return ReportData(
        title="Report " + SCRIPT, mode=mode,
        sources=(("Predictions", "/data/" + FIELD), ("Patient name" + SCRIPT, "Doe^John" + FIELD)),
        cases=cases, failed=((SCRIPT, f"{SCRIPT}: cannot be read ({FIELD})"),),
        charts=(Chart("Dice per case" + FIELD, "caption " + SCRIPT, PNG),), training=(Chart("Curves " + SCRIPT, FIELD, PNG),),
        model_facts=(("Training cases", "3 cases" + FIELD), ("Institution" + FIELD, SCRIPT)),
        summary_metrics={"liver": {"dice_per_case": 0.9}}, created="2024-01-01T00:00:00" + FIELD, version="0.1.0" + SCRIPT,
    )


@pytest.mark.parametrize("mode", ["prediction", "dataset"])
def test_hostile_values_are_escaped_everywhere(mode):
    text = report_html.render_html(hostile_report(mode))
    assert "<script" not in text.lower()
    assert SCRIPT not in text and FIELD not in text and "<img src=x" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in text
    page = Page(text)
    assert not [t for t, _ in page.tags if t == "script"]
    assert all("onerror" not in attrs for _, attrs in page.tags)
    for tag, attrs in page.tags:
        if tag == "img":
            assert attrs["src"].startswith("data:image/png;base64,") and base64.b64decode(attrs["src"].split(",", 1)[1]) == PNG
    # escaped, not dropped: the values read back as they were, in text and in attributes
    visible = "".join(page.text)
    for value in (SCRIPT, "Doe^John" + FIELD, "Series description: " + FIELD, "medium" + FIELD, "3 cases" + FIELD, f"{SCRIPT}: cannot be read ({FIELD})"):
        assert value in visible, value
    attributes = [v for _, attrs in page.tags for v in attrs.values()]
    assert "#case-" + SCRIPT in attributes and "case-" + SCRIPT in attributes
    assert f"{SCRIPT}: Reference{FIELD}, axial slice 1 of 9" in attributes
    assert ("The model was trained on 3 cases" + FIELD) in visible


def test_page_is_self_contained_and_well_formed():
    text = report_html.render_html(hostile_report())
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "http://" not in text and "https://" not in text
    assert text.startswith("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">") and text.rstrip().endswith("</body></html>")
    page = Page(text)
    assert [a["href"] for t, a in page.tags if t == "a"] == ["#case-" + SCRIPT, "#case-case" + FIELD]
    assert len([t for t, _ in page.tags if t == "img"]) == 3 * 3 + 2  # three rows of views, two charts
    assert "n/a" in "".join(page.text)  # NaN tumour Dice


def test_the_template_is_autoescaped_and_marks_nothing_safe():
    env = report_html.environment()
    assert env.autoescape is True
    source = Path(report_html.__file__).with_name("templates").joinpath(report_html.TEMPLATE).read_text(encoding="utf-8")
    assert "|safe" not in source.replace(" ", "") and "autoescape false" not in source and "<script" not in source.lower()
    assert "http" not in source
