"""`autoliver report`: windowing, slice choice and orientation against brute force and
SimpleITK, display aspect from spacing, resampling against scikit-image, and whole pages
(prediction folders with and without references, evaluation and model folders, a dataset)
checked for escaping, self-containedness and content."""

import base64
import io
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import SimpleITK as sitk
from skimage.transform import resize as sk_resize

from autoliver.cli import main
from autoliver.core.errors import MissingArtefactError
from autoliver.evaluate.case_report import case_report
from autoliver.examples.phantom import make_phantom, write_phantom_dataset
from autoliver.io.images import Geometry, write_image
from autoliver.report import charts, overlays
from autoliver.report.build import build_dataset_report, build_prediction_report
from autoliver.report.html import render_html, write_report

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NASTY = 'a<b>&"c\''  # a case name that must be escaped everywhere


class Page(HTMLParser):
    """Every tag's attributes and the visible text of an HTML page."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def images(self) -> list[bytes]:
        out = []
        for tag, attrs in self.tags:
            if tag == "img":
                src = attrs["src"]
                assert src.startswith("data:image/png;base64,")
                out.append(base64.b64decode(src.split(",", 1)[1], validate=True))
        return out


def geometry(shape, spacing=(1.0, 1.0, 1.0), direction=IDENTITY):
    return Geometry(tuple(shape), tuple(float(s) for s in spacing), (0.0, 0.0, 0.0), tuple(direction))


# ---------------------------------------------------------------- pure functions

def test_window_maps_the_abdominal_window_to_grey():
    hu = np.array([-1000, -150, 50, 250, 3000], dtype=np.int16)
    assert overlays.window(hu).tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])
    assert overlays.window(np.array([0.0]), width=100, level=0)[0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="width"):
        overlays.window(hu, width=0)


def brute_force_best(seg, axis):
    for labels in ((2,), (1, 2)):
        counts = np.isin(seg, labels).sum(axis=tuple(a for a in range(3) if a != axis))
        if counts.any():
            return int(np.argmax(counts))
    return seg.shape[axis] // 2


def test_slice_with_most_tumour_matches_brute_force():
    rng = np.random.default_rng(3)
    seg = np.zeros((70, 30, 40), np.uint8)  # more than one counting slab along z
    seg[5:65, 4:26, 5:35] = 1
    seg[40:44, 10:20, 8:12] = 2  # a slab, thickest in z at 40..43
    seg[50, 5:25, 6:34] = 2  # one axial slice with the largest tumour area
    seg[rng.random(seg.shape) < 0.01] = 2  # scattered noise
    orient = overlays.orientation(IDENTITY)
    chosen = overlays.choose_slices([seg], orient)
    assert chosen[0] == 50
    assert chosen == tuple(brute_force_best(seg, a) for a in range(3))


def test_slices_fall_back_to_liver_then_middle_and_sum_over_maps():
    seg = np.zeros((20, 30, 40), np.uint8)
    orient = overlays.orientation(IDENTITY)
    assert overlays.choose_slices([seg], orient) == (10, 15, 20)
    seg[3:6, 2:4, 30:33] = 1
    assert overlays.choose_slices([seg], orient) == (3, 2, 30)
    other = np.zeros_like(seg)
    other[12, 20, 7] = 2  # a tumour only in the second map (e.g. one the model missed)
    assert overlays.choose_slices([seg, other], orient) == (12, 20, 7)
    with pytest.raises(ValueError, match="shape"):
        overlays.choose_slices([seg, other[:5]], orient)


@pytest.mark.parametrize("direction", [
    IDENTITY,
    (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),  # RAS-stored (e.g. from NIfTI tools)
    (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0),  # permuted axes: a sagittal acquisition
    (0.0, 1.0, 0.0, 0.0, 0.0, -1.0, -1.0, 0.0, 0.0),
])
def test_canonical_orientation_matches_simpleitk_dicomorient(direction):
    arr = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    image = sitk.GetImageFromArray(arr)
    image.SetDirection(direction)
    expected = sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))  # (S, P, L), each increasing
    got = overlays.canonical(arr, overlays.orientation(direction))
    np.testing.assert_array_equal(got, expected)


def test_slices_are_chosen_in_the_stored_index_whatever_the_orientation():
    seg = np.zeros((30, 20, 25), np.uint8)
    seg[21, 3:9, 4:10] = 2
    ras = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    views = overlays.case_views(np.zeros(seg.shape, np.int16), geometry(seg.shape, direction=ras), [seg], max_px=32)[0]
    assert [(v.name, v.index, v.count) for v in views] == [
        ("axial", 21, 30), ("coronal", brute_force_best(seg, 1), 20), ("sagittal", brute_force_best(seg, 2), 25)]


def test_display_aspect_follows_the_spacing():
    shape, spacing = (10, 40, 100), (3.0, 1.0, 0.5)  # z 30 mm, y 40 mm, x 50 mm
    views = overlays.case_views(np.zeros(shape, np.int16), geometry(shape, spacing), [None], max_px=320)[0]
    sizes = {v.name: (v.height, v.width) for v in views}
    assert sizes == {"axial": (256, 320), "coronal": (192, 320), "sagittal": (240, 320)}
    for v in views:
        assert v.png.startswith(PNG_MAGIC)
    ct, pixel = overlays.extract(np.zeros(shape), overlays.orientation(IDENTITY), spacing, "sagittal", 0)
    assert ct.shape == (10, 40) and pixel == (3.0, 1.0)


def test_slices_are_resized_pixel_centre_onto_pixel_centre():
    # A HU ramp inside the window: bilinear resampling of a linear image is exact, so the shown
    # grey is known in closed form (pixel centres onto pixel centres, the edges clamped).
    rows, cols = 10, 40
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    ct = -100.0 + 10.0 * r + 2.0 * c  # -100..168 HU, inside the window (-150..250 HU)
    rgb = overlays.render(ct, None, pixel_mm=(2.0, 1.0), max_px=80)
    assert rgb.shape == (40, 80, 3)  # 20 x 40 mm with square pixels, the longer side 80
    src_r = np.clip((np.arange(40) + 0.5) * rows / 40 - 0.5, 0, rows - 1)
    src_c = np.clip((np.arange(80) + 0.5) * cols / 80 - 0.5, 0, cols - 1)
    expected = np.rint(255 * overlays.window(-100.0 + 10.0 * src_r[:, None] + 2.0 * src_c[None, :]))
    assert np.abs(rgb[..., 0].astype(int) - expected).max() <= 1  # float32 rounding at .5
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    # labels: nearest neighbour, so an exact 2x upsampling repeats each label 2 x 2 times
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 3, (13, 29)).astype(np.uint8)
    grey = np.full(lab.shape, 50.0)
    np.testing.assert_array_equal(overlays.render(grey, lab, (1.0, 1.0), max_px=58),
                                  overlays.compose(np.full((26, 58), 0.5), np.kron(lab, np.ones((2, 2), np.uint8))))


@pytest.mark.parametrize("max_px", [64, 12])  # larger and smaller than the slices
def test_views_are_scikit_image_resizes_of_the_slices(max_px):
    """The report's PNGs are the slices windowed, resized by scikit-image with the report's
    parameters (bilinear, edges clamped, no anti-aliasing) and overlaid, on a known volume."""
    from matplotlib.image import imread

    shape, spacing = (9, 14, 22), (3.0, 1.0, 0.5)
    rng = np.random.default_rng(5)
    ct = rng.integers(-200, 300, shape).astype(np.int16)
    seg = np.zeros(shape, np.uint8)
    seg[2:7, 3:11, 4:18] = 1
    seg[4, 5:8, 8:12] = 2
    views = overlays.case_views(ct, geometry(shape, spacing), [seg], max_px=max_px)[0]
    orient = overlays.orientation(IDENTITY)
    indices = overlays.choose_slices([seg], orient)
    for c, v in enumerate(views):
        hu, pixel_mm = overlays.extract(ct, orient, spacing, v.name, indices[c])
        labels = overlays.extract(seg, orient, spacing, v.name, indices[c])[0]
        out = (v.height, v.width)
        assert out == overlays.display_shape(hu.shape, pixel_mm, max_px)
        grey = sk_resize(overlays.window(hu), out, order=1, mode="edge", anti_aliasing=False)
        lab = sk_resize(labels, out, order=0, mode="edge", anti_aliasing=False, preserve_range=True)
        assert set(np.unique(lab)) <= {0, 1, 2}  # nearest neighbour never invents a label
        shown = np.rint(imread(io.BytesIO(v.png), format="png")[..., :3] * 255).astype(np.uint8)
        np.testing.assert_array_equal(shown, overlays.compose(grey, lab))


def test_compose_fills_and_outlines_with_the_legend_colours():
    grey = np.full((9, 9), 0.5)
    lab = np.zeros((9, 9), np.uint8)
    lab[1:8, 1:8] = 1
    lab[3:6, 3:6] = 2
    rgb = overlays.compose(grey, lab).astype(int)
    assert tuple(rgb[0, 0]) == (128, 128, 128)  # background: the CT only
    assert tuple(rgb[1, 1]) == overlays.LIVER_RGB  # liver outline
    assert tuple(rgb[3, 3]) == overlays.TUMOUR_RGB  # tumour outline
    a = overlays.FILL_ALPHA
    assert tuple(rgb[2, 2]) == tuple(int(round((1 - a) * 127.5 + a * c)) for c in overlays.LIVER_RGB)
    assert tuple(rgb[4, 4]) == tuple(int(round((1 - a) * 127.5 + a * c)) for c in overlays.TUMOUR_RGB)


def test_training_curves_from_progress_png_or_log(tmp_path):
    fold0, fold1 = tmp_path / "2d" / "fold_0", tmp_path / "3d_fullres" / "fold_1"
    fold0.mkdir(parents=True)
    fold1.mkdir(parents=True)
    records = [{"epoch": e, "train_loss": 1.0 / (e + 1), "val_loss": 1.2 / (e + 1), "pseudo_dice": {"liver": 0.5, "tumour": 0.2},
                "pseudo_dice_ema": 0.3, "lr": 0.01} for e in range(3)]
    (fold0 / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (fold1 / "progress.png").write_bytes(charts.dice_bar_chart({"x": {"liver": 0.9, "tumour": 0.5}}))
    got = dict(charts.training_curves(tmp_path))
    assert set(got) == {"2d fold 0", "3d_fullres fold 1"}
    assert got["3d_fullres fold 1"] == (fold1 / "progress.png").read_bytes()
    assert got["2d fold 0"].startswith(PNG_MAGIC) and not (fold0 / "progress.png").exists()


# ---------------------------------------------------------------- pages

def write_case(root, case, image, pred, ref, geom, report=True):
    write_image(root / "images" / f"{case}_0000.nii.gz", image, geom)
    if pred is not None:
        write_image(root / "pred" / f"{case}.nii.gz", pred, geom)
        if report:
            (root / "pred" / f"{case}.json").write_text(json.dumps(case_report(pred, geom, configuration="2d")))
    if ref is not None:
        write_image(root / "ref" / f"{case}.nii.gz", ref, geom)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two phantom cases: NASTY (the model misses one of its two tumours) and 'clean' (no tumour)."""
    root = tmp_path_factory.mktemp("report")
    for sub in ("images", "pred", "ref"):
        (root / sub).mkdir()
    geom = geometry((24, 48, 40), (4.0, 3.0, 3.5))
    image, label = make_phantom(geom.shape, geom.spacing, np.random.default_rng(1), n_tumours=2, tumour_radius_mm=(6.0, 9.0))
    pred = label.copy()
    comps, _ = __import__("scipy.ndimage", fromlist=["label"]).label(label == 2)
    pred[comps == 1] = 1
    write_case(root, NASTY, image, pred, label, geom)
    image2, label2 = make_phantom(geom.shape, geom.spacing, np.random.default_rng(2), n_tumours=0)
    write_case(root, "clean", image2, label2, label2, geom)
    return root


def assert_self_contained(text):
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text.lower()


def test_prediction_report_with_references(folders, tmp_path):
    data = build_prediction_report(folders / "pred", folders / "images", references=folders / "ref", progress=False)
    assert [c.case_id for c in data.cases] == sorted([NASTY, "clean"]) and not data.failed
    nasty = next(c for c in data.cases if c.case_id == NASTY)
    assert [title for title, _ in nasty.rows] == ["Model", "Reference"]
    assert nasty.summary.tumour_count == 1 and nasty.reference.tumour_count == 2
    assert 0 < nasty.metrics["tumour"]["dice"] < 1 and nasty.metrics["liver"]["dice"] == pytest.approx(1.0)
    assert data.summary_metrics["tumour"]["dice_per_case"] == pytest.approx((nasty.metrics["tumour"]["dice"] + 1.0) / 2)
    out = write_report(data, tmp_path / "sub" / "report.html")
    text = out.read_text(encoding="utf-8")
    assert_self_contained(text)
    assert NASTY not in text and "a&lt;b&gt;&amp;&#34;c&#39;" in text  # escaped in text and attributes
    assert 'href="#case-a&lt;b&gt;&amp;&#34;c&#39;"' in text and 'alt="a&lt;b&gt;&amp;&#34;c&#39;: Model, axial' in text
    page = Page(text)
    pngs = page.images()
    assert all(p.startswith(PNG_MAGIC) for p in pngs)
    assert len(pngs) == 2 * 2 * 3 + len(data.charts)
    titles = [c.title for c in data.charts]
    assert "Dice per case" in titles and "Dice per configuration" in titles
    visible = " ".join(page.text)
    for words in ("How to read", "Liver", "Tumour", "Dice", "Limits", "not a diagnosis", "400 HU", "No tumour found."):
        assert words.lower() in visible.lower()
    assert list(tmp_path.joinpath("sub").iterdir()) == [out]  # atomic write: no temporary left


def test_prediction_report_without_references_reads_the_case_json(folders, tmp_path):
    pred = tmp_path / "pred"
    pred.mkdir()
    for f in (folders / "pred").iterdir():
        (pred / f.name).write_bytes(f.read_bytes())
    case_json = pred / "clean.json"
    report = json.loads(case_json.read_text())
    report["liver_volume_ml"] = 1234.5  # the report shows what predict measured, not a recount
    case_json.write_text(json.dumps(report))
    (pred / f"{NASTY}.json").unlink()  # no report: measured from the segmentation
    data = build_prediction_report(pred, folders / "images", progress=False)
    by_id = {c.case_id: c for c in data.cases}
    assert by_id["clean"].summary.liver_volume_ml == 1234.5 and by_id["clean"].summary.tumour_count == 0
    assert by_id[NASTY].summary.tumour_count == 1
    assert all(c.metrics is None and c.reference is None and len(c.rows) == 1 for c in data.cases)
    assert data.charts == () and data.summary_metrics is None
    text = render_html(data)
    assert_self_contained(text)
    assert len(Page(text).images()) == 2 * 3
    assert "Dice per case" not in text and "1234.5" in text


def fake_evaluation(folder, per_case):
    folder.mkdir(parents=True)
    entries = {c: {"liver": {"dice": l, "hd95_mm": 2.0}, "tumour": {"dice": t, "hd95_mm": None}} for c, (l, t) in per_case.items()}
    summary = {"liver": {"dice_per_case": 0.5}, "tumour": {"dice_per_case": 0.25}, "n_cases": len(per_case)}
    (folder / "evaluation.json").write_text(json.dumps({"schema_version": 1, "per_case": entries, "summary": summary}))


def test_evaluation_folders_and_model_folder(folders, tmp_path):
    fake_evaluation(tmp_path / "eval_2d", {NASTY: (0.91, 0.42), "clean": (0.93, 1.0)})
    fake_evaluation(tmp_path / "eval_3d", {NASTY: (0.95, 0.61), "clean": (0.96, 1.0)})
    model = tmp_path / "results" / "Dataset001_X"
    fold = model / "2d" / "fold_0"
    fold.mkdir(parents=True)
    (fold / "log.jsonl").write_text(json.dumps({"epoch": 0, "train_loss": 1.0, "lr": 0.01}) + "\n")
    (fold / "metrics.json").write_text(json.dumps({"per_case": {"a": {"liver": 0.8, "tumour": 0.3}, "b": {"liver": 0.9, "tumour": 0.5}}}))
    (model / "splits.json").write_text(json.dumps([{"train": ["a", "c"], "val": ["b"]}]))
    data = build_prediction_report(folders / "pred", folders / "images", evaluations=[tmp_path / "eval_2d", tmp_path / "eval_3d"],
                                   model_dir=model, progress=False)
    assert {c.case_id: c.metrics["tumour"]["dice"] for c in data.cases} == {NASTY: 0.42, "clean": 1.0}  # the first folder's
    assert [c.title for c in data.charts] == ["Dice per case", "Dice per configuration", "Boundary distance per case (HD95)"]
    assert [c.title for c in data.training] == ["Training curves: 2d fold 0"]
    facts = dict(data.model_facts)
    assert facts["Training cases"] == "3 cases"
    assert facts["CV 2d: mean Dice"].startswith("liver 0.850, tumour 0.400")
    text = render_html(data)
    assert "trained on 3 cases" in text and "0.420" in text
    with pytest.raises(MissingArtefactError, match="autoliver evaluate"):
        build_prediction_report(folders / "pred", folders / "images", evaluations=[tmp_path / "nowhere"], progress=False)


def test_a_bad_case_is_listed_and_the_others_reported(folders, tmp_path):
    pred = tmp_path / "pred"
    pred.mkdir()
    for f in (folders / "pred").glob("*.nii.gz"):
        (pred / f.name).write_bytes(f.read_bytes())
    write_image(pred / "orphan.nii.gz", np.zeros((4, 5, 6), np.uint8), geometry((4, 5, 6)))  # no CT image
    (pred / "clean.nii.gz").write_bytes((pred / "clean.nii.gz").read_bytes()[:200])  # truncated
    data = build_prediction_report(pred, folders / "images", progress=False)
    assert [c.case_id for c in data.cases] == [NASTY]
    failed = dict(data.failed)
    assert set(failed) == {"clean", "orphan"} and "no CT image" in failed["orphan"]
    text = render_html(data)
    assert "could not be shown" in text and "orphan" in text


def test_dataset_report_and_cli(tmp_path):
    root = write_phantom_dataset(tmp_path / "raw", 2, np.random.default_rng(0), shape=(20, 40, 40), spacing=(4.0, 3.0, 3.0),
                                 dataset_name="Dataset901_Report", n_tumours=(0, 2))
    data = build_dataset_report(root, progress=False)
    assert data.mode == "dataset" and len(data.cases) == 2
    for case in data.cases:
        assert [t for t, _ in case.rows] == ["Reference"]
        from autoliver.io.images import read_image

        lab, geom = read_image(root / "labelsTr" / f"{case.case_id}.nii.gz")
        assert case.summary.liver_volume_ml == pytest.approx(case_report(lab, geom)["liver_volume_ml"])
    out = tmp_path / "dataset.html"
    assert main(["report", "-d", str(root), "-o", str(out), "--no-progress", "-np", "1", "--image-size", "64"]) == 0
    page = Page(out.read_text(encoding="utf-8"))
    assert len(page.images()) == 2 * 3
    assert main(["report", "-p", str(root / "labelsTr"), "-o", str(tmp_path / "x.html"), "--no-progress"]) == 2  # no -i
    assert main(["report", "-d", str(root), "-i", str(root), "-o", str(tmp_path / "x.html"), "--no-progress"]) == 2
    assert main(["report", "-d", str(root), "-o", str(tmp_path / "x.html"), "--image-size", "4", "--no-progress"]) == 2
    assert not (tmp_path / "x.html").exists()


def test_cli_prediction_report(folders, tmp_path):
    out = tmp_path / "r.html"
    assert main(["report", "-p", str(folders / "pred"), "-i", str(folders / "images"), "-r", str(folders / "ref"),
                 "-o", str(out), "--no-progress", "-np", "1", "--image-size", "96"]) == 0
    text = out.read_text(encoding="utf-8")
    assert_self_contained(text)
    assert "Agreement with the reference" in text
