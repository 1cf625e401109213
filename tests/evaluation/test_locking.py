"""The locking index, follow rates, score-tag effect, summary and comparison on constructed judge outputs whose
answers are known (services/trainer/evaluation/locking.py's definitions)."""

from __future__ import annotations

import json

import pytest

from services.trainer.evaluation import locking
from services.trainer.evaluation.grid import build_grid
from services.trainer.evaluation.results import Comparison, Report
from tests.evaluation.judged import FOLLOWED, SPEC, make_report


def test_locking_index_per_content_is_its_excess_miss_rate_over_each_styles_rate() -> None:
    report = make_report(FOLLOWED, 2)
    by_content = {x.content_id: x for x in report.locking}
    # m(A) = (1 + 0 + 0.5) / 3 = 0.5, m(B) = (0.5 + 0 + 0.5) / 3 = 1/3
    assert by_content["portrait"].locking_index == pytest.approx((0.5 + 1 / 6) / 2)  # 1/3
    assert by_content["landscape"].locking_index == pytest.approx((-0.5 - 1 / 3) / 2)  # -5/12
    assert by_content["object"].locking_index == pytest.approx((0.0 + 1 / 6) / 2)  # 1/12
    assert by_content["portrait"].miss_rate == pytest.approx(0.75)
    assert by_content["portrait"].expected_miss_rate == pytest.approx((0.5 + 1 / 3) / 2)
    assert by_content["portrait"].worst_style_id == "cluster_0"
    assert by_content["landscape"].worst_style_id == ""
    assert [x.content_id for x in report.locking if x.locked] == ["portrait"]  # threshold 0.25
    assert sum(x.locking_index for x in report.locking) == pytest.approx(0.0)  # a full grid balances out
    assert all(x.n == 8 for x in report.locking)  # 2 styles x 2 seeds x score tags on/off


def test_summary_follow_rates_and_score_tag_effect() -> None:
    report = make_report(FOLLOWED, 2)
    s = report.summary
    assert s.locking == pytest.approx((1 / 3 + 0 + 1 / 12) / 3)  # 5/36
    assert s.max_locking == pytest.approx(1 / 3)
    assert s.locked_contents == ("portrait",)
    rates = {r.style_id: r.follow_rate for r in report.style_rates}
    assert rates == {"cluster_0": pytest.approx(0.5), "cluster_1": pytest.approx(2 / 3)}
    assert s.follow_rate == pytest.approx(7 / 12)
    whole, *per_content = report.score_tag_effects
    assert whole.content_id == "" and whole.n_pairs == 3 * 2 * 2
    assert whole.delta == pytest.approx(0.2) and whole.win_rate == 1.0
    assert [e.content_id for e in per_content] == ["portrait", "landscape", "object"]
    assert s.score_tag_delta == pytest.approx(0.2)
    agg = {(a.content_id, a.style_id, a.score_tags): a for a in report.aggregates}
    assert agg[("portrait", "cluster_1", True)].follow_rate == 0.5 and agg[("portrait", "cluster_1", True)].n == 2
    assert len(report.aggregates) == 3 * 2 * 2


def test_a_version_that_follows_everywhere_locks_nothing() -> None:
    report = make_report(None, 1)
    assert report.summary.locking == 0.0 and report.summary.follow_rate == 1.0
    assert not any(x.locked for x in report.locking)


def test_comparison_names_the_regressions_beyond_the_threshold() -> None:
    base, candidate = make_report(None, 1), make_report(FOLLOWED, 2)
    cmp = locking.compare(base, candidate, 0.1)
    assert cmp.regressed
    assert [(r.scope, r.key) for r in cmp.regressions] == [
        ("summary", "locking"),
        ("summary", "follow_rate"),
        ("content", "portrait"),
    ]
    assert cmp.locking_delta == pytest.approx(5 / 36)
    assert cmp.follow_rate_delta == pytest.approx(-5 / 12)
    assert cmp.content_deltas["object"] == pytest.approx(1 / 12)  # below 0.1: not a regression
    assert "content 'portrait' locks more" in cmp.reason() and "pony_v7 v2+style_lora:0.8 vs pony_v7 v1" in cmp.reason()
    # A looser threshold: only the follow-rate fall (5/12) remains beyond it.
    assert [r.key for r in locking.compare(base, candidate, 0.4).regressions] == ["follow_rate"]
    # Better, not worse: the other way round is no regression.
    assert not locking.compare(candidate, base, 0.1).regressed
    with pytest.raises(ValueError, match="threshold"):
        locking.compare(base, candidate, -1)


def test_source_and_word_styles_are_judged_against_their_most_assigned_cluster() -> None:
    from services.trainer.evaluation.grid import GridSpec

    spec = GridSpec(contents=SPEC.contents, clusters=((3, "style_cluster_3"),), sources=("anime",), words=("ink",))
    cells = build_grid(spec)
    assigned = {}
    for i, cell in enumerate(cells):
        if cell.style.style_id == "source_anime":
            assigned[cell.cell_id] = 5 if i % 3 else 2  # 5 wins
        elif cell.style.style_id == "word_ink":
            assigned[cell.cell_id] = 4 if i % 2 else 1  # a tie: the lower id
        else:
            assigned[cell.cell_id] = 0
    assert locking.resolve_style_clusters(cells, assigned) == {"cluster_3": 3, "source_anime": 5, "word_ink": 1}


def test_reports_and_comparisons_round_trip_through_json() -> None:
    base, candidate = make_report(None, 1), make_report(FOLLOWED, 2)
    again = Report.from_dict(json.loads(json.dumps(candidate.to_dict())))
    assert again == candidate
    cmp = locking.compare(base, candidate, 0.1)
    assert Comparison.from_dict(json.loads(json.dumps(cmp.to_dict()))) == cmp
