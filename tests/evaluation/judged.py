"""Constructed judge outputs with known answers, for the locking and comparison tests."""

from __future__ import annotations

from services.trainer.evaluation import locking
from services.trainer.evaluation.grid import GridSpec, build_grid
from services.trainer.evaluation.results import (
    Adapter,
    ContentPrompt,
    Cost,
    GridCell,
    ImageJudgement,
    Report,
    StyleRequest,
)

CONTENTS = (
    ContentPrompt("portrait", "a portrait", "portrait"),
    ContentPrompt("landscape", "a landscape", "landscape"),
    ContentPrompt("object", "a teapot", "object"),
)
STYLE_A = StyleRequest("cluster_0", "cluster", "style_cluster_0", ("style_cluster_0",), 0)
STYLE_B = StyleRequest("cluster_1", "cluster", "style_cluster_1", ("style_cluster_1",), 1)
SPEC = GridSpec(contents=CONTENTS, clusters=((0, "style_cluster_0"), (1, "style_cluster_1")), sources=(), words=(),
                seeds=2)  # fmt: skip

# Images that follow their style per (content, style): of the 2 seeds, with score tags on and off alike.
# m(portrait, A) = 1, m(portrait, B) = 0.5, m(landscape, *) = 0, m(object, *) = 0.5.
FOLLOWED = {
    ("portrait", "cluster_0"): (False, False),
    ("portrait", "cluster_1"): (True, False),
    ("landscape", "cluster_0"): (True, True),
    ("landscape", "cluster_1"): (True, True),
    ("object", "cluster_0"): (True, False),
    ("object", "cluster_1"): (False, True),
}


def judge(cell: GridCell, followed: bool, aesthetic: float) -> ImageJudgement:
    requested = cell.style.cluster
    assert requested is not None
    return ImageJudgement(
        cell_id=cell.cell_id,
        assigned_cluster=requested if followed else 1 - requested,
        requested_cluster=requested,
        cluster_distance=0.1 if followed else 0.6,
        followed=followed,
        content_similarity=0.3,
        aesthetic_score=aesthetic,
    )


def make_report(followed: dict[tuple[str, str], tuple[bool, bool]] | None, version: int) -> Report:
    """A report over SPEC; `followed` None = every image follows. Aesthetic: 0.6 with score tags, 0.4 without."""
    cells = build_grid(SPEC)
    judgements = []
    for cell in cells:
        ok = True if followed is None else followed[(cell.content_id, cell.style.style_id)][cell.seed - SPEC.base_seed]
        judgements.append(judge(cell, ok, 0.6 if cell.score_tags else 0.4))
    styles = SPEC.styles()
    lock = locking.content_locking(CONTENTS, cells, judgements, 0.25)
    rates = locking.style_follow_rates(styles, cells, judgements)
    effects = locking.score_tag_effects(CONTENTS, cells, judgements)
    adapters = (Adapter("style_lora", 0.8),)
    return Report(
        evaluation_id=f"eval-{version}",
        model="pony_v7",
        version=version,
        adapters=adapters,
        created_at="2026-11-30T00:00:00+00:00",
        contents=CONTENTS,
        styles=styles,
        cells=cells,
        judgements=tuple(judgements),
        aggregates=locking.aggregate_cells(cells, judgements),
        locking=lock,
        style_rates=rates,
        score_tag_effects=effects,
        summary=locking.summarize("pony_v7", version, adapters, judgements, lock, rates, effects),
        cost=Cost(images=len(cells), seconds=1.0, generate_seconds=0.5, judge_seconds=0.5),
    )
