"""The report's HTML page on a report built from constructed judge outputs: heatmap cells, the locked content named,
the comparison's regressions named, a hostile prompt kept as text, nothing fetched from outside, the same page for
the same report; and the page rendered by headless Chromium to a non-blank screenshot (skipped without Chromium)."""

from __future__ import annotations

import base64
import dataclasses
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from pony_common.blobs import BlobStore
from services.trainer.evaluation import locking
from services.trainer.evaluation.grid import GridSpec, build_grid
from services.trainer.evaluation.report_files import report_from_json, report_json_bytes
from services.trainer.evaluation.report_html import (
    THUMB_PX,
    find_chromium,
    render_html,
    screenshot,
    thumbnail,
    write_html,
)
from services.trainer.evaluation.results import (
    Adapter,
    ContentPrompt,
    Cost,
    GridCell,
    ImageJudgement,
    Report,
)

HOSTILE = '<script>alert("x")</script> portrait <img src="http://evil.example/x.png"> & friends'
CONTENTS = (
    ContentPrompt("portrait", HOSTILE, "portrait"),
    ContentPrompt("landscape", "a mountain landscape with a lake", "landscape"),
    ContentPrompt("object", "a red teapot on a table", "object"),
)
SPEC = GridSpec(
    contents=CONTENTS, clusters=((0, "style_cluster_0"), (1, "style_cluster_1")), sources=("anime",),
    words=("watercolor painting",), seeds=2,
)  # fmt: skip
# The source and word requests as the judge resolved them (the cluster their images get most often).
RESOLVED = {"source_anime": 2, "word_watercolor_painting": 3}
PALETTE = ((200, 60, 60), (60, 160, 80), (60, 90, 200), (220, 180, 40))


def resolved_cells() -> tuple[GridCell, ...]:
    out = []
    for cell in build_grid(SPEC):
        cluster = RESOLVED.get(cell.style.style_id, cell.style.cluster)
        out.append(dataclasses.replace(cell, style=dataclasses.replace(cell.style, cluster=cluster)))
    return tuple(out)


def follows(cell: GridCell, locked: bool) -> bool:
    """`locked`: the portrait follows only cluster 0 (m = 1 for the three other styles), every other image follows.
    Then m(s) = 1/3 for those three styles, 0 for cluster 0, and L(portrait) = (0 + 3 * 2/3) / 4 = 0.5."""
    return not (locked and cell.content_id == "portrait" and cell.style.style_id != "cluster_0")


def png_for(cell: GridCell, cluster: int) -> bytes:
    """A 256x192 picture coloured by the cluster it was assigned, with the seed drawn on it."""
    img = Image.new("RGB", (256, 192), PALETTE[cluster % len(PALETTE)])
    draw = ImageDraw.Draw(img)
    draw.ellipse((40 + cell.seed % 7 * 10, 30, 200, 170), fill=(250, 250, 250))
    draw.text((10, 10), f"{cell.content_id} {cell.seed}", fill=(0, 0, 0))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def make_report(locked: bool, version: int, store: BlobStore | None = None) -> tuple[Report, dict[str, bytes]]:
    """The report over SPEC and the images of its cells ({cell_id: PNG}); with `store`, the images of the
    `object` content are only in the store (image_uri) and not in the mapping, and one portrait image is absent."""
    cells = resolved_cells()
    judgements, images = [], {}
    for cell in cells:
        ok = follows(cell, locked)
        requested = cell.style.cluster
        assert requested is not None
        assigned = requested if ok else 1
        png = png_for(cell, assigned)
        uri = ""
        if store is not None and cell.content_id == "object":
            uri = store.uri(store.put(f"eval/{cell.cell_id.replace('|', '_')}.png", png))
        elif cell.cell_id != "portrait|cluster_1|st|1001":
            images[cell.cell_id] = png
        judgements.append(
            ImageJudgement(
                cell_id=cell.cell_id,
                assigned_cluster=assigned,
                requested_cluster=requested,
                cluster_distance=0.1 if ok else 0.7,
                followed=ok,
                content_similarity=0.31,
                aesthetic_score=0.62 if cell.score_tags else 0.48,
                image_uri=uri,
            )
        )
    styles = tuple(dataclasses.replace(s, cluster=RESOLVED.get(s.style_id, s.cluster)) for s in SPEC.styles())
    lock = locking.content_locking(CONTENTS, cells, judgements, 0.25)
    rates = locking.style_follow_rates(styles, cells, judgements)
    effects = locking.score_tag_effects(CONTENTS, cells, judgements)
    adapters = (Adapter("style_lora", 0.8),)
    report = Report(
        evaluation_id=f"eval-{version}",
        model="pony_v7",
        version=version,
        adapters=adapters,
        created_at="2026-11-30T12:00:00+00:00",
        contents=CONTENTS,
        styles=styles,
        cells=cells,
        judgements=tuple(judgements),
        aggregates=locking.aggregate_cells(cells, judgements),
        locking=lock,
        style_rates=rates,
        score_tag_effects=effects,
        summary=locking.summarize("pony_v7", version, adapters, judgements, lock, rates, effects),
        cost=Cost(images=len(cells), seconds=12.5, generate_seconds=10.0, judge_seconds=2.5),
        settings={"steps": 4, "resolution": 64},
    )
    return report, images


class Page(HTMLParser):
    """The parts of the page the tests look at."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.heat: dict[str, dict[tuple[str, str], str]] = {}
        self.locked_items: dict[str, str] = {}
        self.captions: list[str] = []
        self._table: str | None = None
        self._open: tuple[str, object] | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append((tag, a))
        if tag == "table" and a.get("id", "").startswith("heatmap-"):
            self._table = a["id"].removeprefix("heatmap-")
            self.heat[self._table] = {}
        elif tag == "td" and "heat" in a.get("class", "").split() and self._table and "data-content" in a:
            self._open, self._text = ("heat", (self._table, a["data-content"], a["data-style"])), []
        elif tag == "li" and "locked-content" in a.get("class", ""):
            self._open, self._text = ("locked", a["data-content"]), []
        elif tag == "figcaption":
            self._open, self._text = ("caption", None), []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None
        if self._open is None:
            return
        kind, key = self._open
        text = "".join(self._text).strip()
        if kind == "heat" and tag == "td":
            table, content, style = key  # type: ignore[misc]
            self.heat[table][(content, style)] = text
            self._open = None
        elif kind == "locked" and tag == "li":
            self.locked_items[key] = text  # type: ignore[index]
            self._open = None
        elif kind == "caption" and tag == "figcaption":
            self.captions.append(text)
            self._open = None

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self._text.append(data)


def parse(page: str) -> Page:
    parser = Page()
    parser.feed(page)
    parser.close()
    return parser


@pytest.fixture(scope="module")
def locked_report() -> tuple[Report, dict[str, bytes]]:
    return make_report(locked=True, version=8)


def test_heatmap_has_one_cell_per_content_and_style_with_its_follow_rate(locked_report):
    report, images = locked_report
    page = parse(render_html(report, images))
    follow = page.heat["follow"]
    assert set(follow) == {(c.content_id, s.style_id) for c in CONTENTS for s in report.styles}
    assert follow[("portrait", "cluster_0")] == "100%"
    assert follow[("portrait", "cluster_1")] == "0%"
    assert follow[("landscape", "source_anime")] == "100%"
    excess = page.heat["locking"]
    assert len(excess) == len(CONTENTS) * len(report.styles)
    assert excess[("portrait", "word_watercolor_painting")] == "+0.67"  # m = 1 vs m(s) = 1/3
    assert excess[("object", "cluster_1")] == "-0.33"


def test_locked_content_is_named_with_its_index(locked_report):
    report, images = locked_report
    assert [x.content_id for x in report.locking if x.locked] == ["portrait"]
    page_text = render_html(report, images)
    page = parse(page_text)
    assert set(page.locked_items) == {"portrait"}
    assert "+0.500" in page.locked_items["portrait"]
    assert "portrait" in page.locked_items["portrait"]
    # a higher threshold names none
    assert parse(render_html(report, images, threshold=0.6)).locked_items == {}


def test_hostile_prompt_stays_text_and_nothing_is_fetched(locked_report):
    report, images = locked_report
    page_text = render_html(report, images)
    page = parse(page_text)
    assert "<script" not in page_text.lower()
    assert "&lt;script&gt;" in page_text
    assert 'src="http' not in page_text
    assert not [t for t, _ in page.tags if t in ("script", "link", "iframe", "object", "embed", "base", "form")]
    srcs = [a["src"] for t, a in page.tags if t == "img"]
    assert srcs and all(s.startswith("data:image/jpeg;base64,") for s in srcs)
    for _, attrs in page.tags:  # no attribute points outside the page
        for name, value in attrs.items():
            assert not re.match(r"\s*(https?:|//)", value), (name, value[:80])
    assert "url(" not in page_text  # no CSS fetch either
    # the hostile text is shown, as text
    assert HOSTILE in parse_text(page_text)


def parse_text(page_text: str) -> str:
    chunks: list[str] = []

    class Text(HTMLParser):
        def handle_data(self, data: str) -> None:
            chunks.append(data)

    Text(convert_charrefs=True).feed(page_text)
    return "".join(chunks)


def test_grid_shows_every_image_as_a_small_thumbnail_with_its_seed(locked_report, tmp_path):
    store = BlobStore(str(tmp_path / "blobs"))
    report, images = make_report(locked=True, version=8, store=store)
    page = parse(render_html(report, images))
    imgs = [a["src"] for t, a in page.tags if t == "img"]
    # every cell but the one portrait image that is nowhere; the object images came from their blob URIs
    assert len(imgs) == len(report.cells) - 1
    assert sorted(set(page.captions)) == ["seed 1000", "seed 1001"]
    assert len(page.captions) == len(report.cells)
    assert sum(1 for t, a in page.tags if t == "div" and "noimg" in a.get("class", "")) == 1
    thumb = Image.open(io.BytesIO(base64.b64decode(imgs[0].split(",", 1)[1])))
    assert max(thumb.size) == THUMB_PX and thumb.size == (THUMB_PX, THUMB_PX * 192 // 256)
    # without reading URIs, the object images are grey boxes
    page = parse(render_html(report, images, read_image=None))
    assert len([1 for t, _ in page.tags if t == "img"]) == len(report.cells) - 1 - 16


def test_score_tag_effect_and_summary_are_shown(locked_report):
    report, images = locked_report
    text = parse_text(render_html(report, images))
    assert "Score-tag effect" in text
    assert "+0.140" in text  # 0.62 with vs 0.48 without, whole grid and every content
    assert "Version summary" in text and "pony_v7 v8 + style_lora:0.8" in text


def test_comparison_names_the_regressions():
    base, _ = make_report(locked=False, version=7)
    candidate, images = make_report(locked=True, version=8)
    comparison = locking.compare(base, candidate, 0.1)
    assert comparison.regressed
    page_text = render_html(candidate, images, comparison)
    text = parse_text(page_text)
    for r in comparison.regressions:
        assert r.message in text
    assert "regression(s) beyond 0.1" in text
    calm = locking.compare(base, base, 0.1)
    assert "No regression beyond 0.1" in parse_text(render_html(base, None, calm, read_image=None))


def test_same_report_gives_the_same_page(locked_report):
    report, images = locked_report
    assert render_html(report, images) == render_html(report, dict(images))


def test_thumbnail_of_non_image_bytes_is_none():
    assert thumbnail(b"not a png") is None


def test_chromium_renders_the_page_to_a_non_blank_screenshot(locked_report, tmp_path: Path):
    browser = find_chromium()
    if browser is None:
        pytest.skip("no Chromium on PATH (Debian: apt-get install chromium); the HTML checks above still ran")
    base, _ = make_report(locked=False, version=7)
    report, images = locked_report
    page = write_html(report, tmp_path / "report.html", images, locking.compare(base, report, 0.1))
    png = screenshot(page, tmp_path / "report.png", width=1280, height=1600, chromium=browser)
    shot = Image.open(png).convert("RGB")
    assert shot.size == (1280, 1600)
    colours = shot.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, heatmap colours and thumbnails, not a blank page
    # the heatmap's viridis cells are on the first screen: a strongly coloured pixel count well above zero
    saturated = sum(n for n, (r, g, b) in colours if max(r, g, b) - min(r, g, b) > 80)
    assert saturated > 1000


def test_figures_without_a_value_show_a_dash(locked_report):
    """A figure over no images (NaN, read back from JSON as None) renders as "–" instead of failing the page."""
    report, _ = locked_report
    summary = dataclasses.replace(report.summary, locking=float("nan"), follow_rate=float("nan"))
    lock = tuple(dataclasses.replace(x, locking_index=float("nan")) for x in report.locking)
    odd = dataclasses.replace(report, summary=summary, locking=lock)
    for variant in (odd, report_from_json(report_json_bytes(odd))):
        page = parse(render_html(variant, None, read_image=None))
        assert page.locked_items == {}
        assert "L = –" in parse_text(render_html(variant, None, read_image=None))
