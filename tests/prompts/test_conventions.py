"""One prompt convention per model family: tags true of the image, what the sampler asks for, palette tags, the
style tag format, the token budget (a real tiny tokenizer), and the same tag string in export, training and sampler."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pony_common.errors import InvalidArgument
from pony_common.manifest import SCHEMA
from pony_common.prompts import PALETTE_COLORS, V6, V7, ImageTags, convention, palette_tag, style_tag
from pony_common.prompts.budget import TokenBudget, TokenStats
from pony_common.tags import parse_score_tag
from services.curation.export import manifest_row
from services.curation.records import ImageRecord
from services.sampler.prompts import PromptTags, assemble_prompt
from services.stack.tiny import ENGLISH_WORDS, auraflow_tokenizer, clip_tokenizer
from services.style_tagger.clusters import format_tag
from services.style_tagger.palette import COLOR_VOCABULARY
from services.trainer.spec import CaptionSpec
from services.trainer.training.captions import training_prompt
from services.trainer.training.manifest import read_manifest


@pytest.mark.parametrize("family", [V7, V6])
def test_an_image_carries_no_score_tag_above_its_bucket(family) -> None:
    for bucket in range(10):
        tags = family.score_tags(bucket)
        assert tags[0] == f"score_{bucket}"
        assert all(parse_score_tag(t) <= bucket for t in tags)


@pytest.mark.parametrize("family", [V7, V6])
def test_asking_for_score_n_or_better_sends_tags_training_put_on_those_images(family) -> None:
    for asked in range(10):
        query = family.score_query(asked)
        if family is V6 and asked < 4:
            assert query == []  # below score_4_up no tag is shared by every image at or above the bucket
            continue
        assert query
        for bucket in range(10):
            carried = set(family.score_tags(bucket))
            if family is V7:
                # Every tag sent is on some accepted image and on no image below the bucket asked for.
                assert (bool(set(query) & carried)) == (bucket >= asked)
            else:
                # Every accepted image carries every tag sent; an image below the bucket does not.
                assert set(query) <= carried if bucket >= asked else not set(query) <= carried


def test_the_v6_top_image_and_the_v6_top_query_are_the_canonical_pony_prompt() -> None:
    canonical = ["score_9", "score_8_up", "score_7_up", "score_6_up", "score_5_up", "score_4_up"]
    assert V6.score_tags(9) == canonical and V6.score_query(9) == canonical
    assert V6.score_tags(7) == ["score_7", "score_7_up", "score_6_up", "score_5_up", "score_4_up"]
    assert V6.score_query(8) == canonical[1:]
    assert V7.score_query(8) == ["score_9", "score_8"]
    assert convention("V6") is V6 and convention("v7") is V7
    with pytest.raises(ValueError, match="unknown model family"):
        convention("v5")


def test_palette_vocabulary_is_the_style_taggers() -> None:
    assert set(PALETTE_COLORS) == set(COLOR_VOCABULARY)
    assert palette_tag("Sky_Blue") == palette_tag("palette_sky_blue") == "palette_sky_blue"
    with pytest.raises(ValueError, match="unknown palette colour"):
        palette_tag("mauve")


def test_style_tag_format_matches_the_style_tagger_and_falls_back_without_a_family() -> None:
    for fmt, family in [("style_cluster_{n}", "anime"), ("{family}_{n}", "anime"), ("{family}_{n}", "Western!")]:
        assert style_tag(fmt, 42, family) == format_tag(fmt, 42, family)
    assert style_tag("{family}_{n}", 7) == format_tag("{family}_{n}", 7, "") == "style_7"  # a global cluster set
    # The sampler: the request's family, else the global token (never a KeyError, never a guess from the source).
    fmt = "{family}_{n}"
    assert assemble_prompt("x", PromptTags(style_clusters=(4,), style_family="furry"), style_format=fmt) == "furry_4, x"
    assert assemble_prompt("x", PromptTags(style_clusters=(4,), source="cartoon"), style_format=fmt).startswith(
        "style_4, source_cartoon"
    )
    assert assemble_prompt("x", PromptTags(style_clusters=(4,)), style_format=fmt) == "style_4, x"


def _record(style_format: str) -> ImageRecord:
    return ImageRecord(
        image_id="cd" * 32,
        blob_key="images/cd/y.png",
        width=64,
        height=64,
        format="PNG",
        category="anime",
        status="done",
        error=None,
        tags=["fox", "snow", "artist:someone"],
        characters=["aoi hoshino"],
        artist="someone",
        source_site="danbooru",
        source_uri=None,
        dup_group=None,
        is_duplicate=False,
        captions={"medium": "A fox in the snow.", "style": "Ink lines."},
        score=0.93,
        score_tag="score_9",
        style_tag=format_tag(style_format, 3, "anime"),  # as the style tagger writes it (per-family set)
        style_cluster=3,
        palette_tags=["palette_red", "palette_sky_blue", "palette_not_a_colour"],
        rating="safe",
        decision="allow",
    )


@pytest.mark.parametrize("family", ["v7", "v6"])
@pytest.mark.parametrize("style_format", ["style_cluster_{n}", "{family}_{n}"])
def test_export_training_and_sampler_give_one_tag_string(family: str, style_format: str, tmp_path: Path) -> None:
    conv = convention(family)
    # Export: the manifest row, written and read back the way the trainer reads it.
    row = manifest_row(_record(style_format), "images/y.png", 0, family=conv)
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({f.name: [row.get(f.name)] for f in SCHEMA}, schema=SCHEMA), manifest)
    (item,) = read_manifest(manifest)
    exported = ", ".join(row["special_tags"])
    # Training with dropout, shuffling, empty and assembled prompts off.
    spec = CaptionSpec(kinds=("medium",), prompt_probability=0, shuffle_tags=False, tag_dropout=0, empty_probability=0)
    trained = training_prompt(item, spec, random.Random(0))
    # The sampler asked for the same attributes (score 9 or better, the cluster, source, rating, palette).
    asked = PromptTags(
        score=9, style_clusters=(3,), source="anime", rating="safe", palette=("red", "sky_blue"), style_family="anime"
    )
    asked.validate()
    sent = assemble_prompt("A fox in the snow.", asked, style_format=style_format, convention=conv)
    assert row["prompt"].startswith(exported + ", A fox in the snow.")
    assert trained.startswith(exported + ", A fox in the snow.")
    assert sent == exported + ", A fox in the snow."
    assert "palette_red, palette_sky_blue" in exported and "palette_not_a_colour" not in exported
    assert exported.startswith(", ".join(conv.score_tags(9)))


def _words(n: int, start: int = 0) -> list[str]:
    return [ENGLISH_WORDS[(start + i) % len(ENGLISH_WORDS)] for i in range(n)]


@pytest.mark.parametrize(("tokenizer", "family"), [(auraflow_tokenizer, V7), (clip_tokenizer, V6)])
def test_the_budget_drops_extra_tags_from_the_end_first_and_never_special_tags(tokenizer, family) -> None:
    budget = TokenBudget(tokenizer(), family)
    assert budget.max_tokens == family.max_tokens
    special = family.image_special_tags(
        ImageTags(bucket=9, styles=("style_cluster_3",), source="source_anime", rating="rating_safe")
    )
    description = " ".join(_words(12))
    fits = budget.fit(special, [description], _words(3, 50))
    assert not fits.cut and fits.tokens == budget.count(fits.text) <= budget.max_tokens
    extra = _words(400, 100)
    fitted = budget.fit(special, [description], extra)
    assert fitted.cut and not fitted.shortened and 0 < fitted.dropped_tags < len(extra)
    kept = len(extra) - fitted.dropped_tags
    assert fitted.text == ", ".join([*special, description, *extra[:kept]])  # a prefix: dropped from the end
    assert fitted.tokens <= budget.max_tokens < budget.count(", ".join([*special, description, *extra[: kept + 1]]))
    # A description too long on its own: every extra tag goes, then the description is shortened; specials stay.
    long = budget.fit(special, [" ".join(_words(2000)), "ink lines"], ["fox"])
    assert long.shortened and long.dropped_tags == 1 and not long.over
    assert long.text.startswith(", ".join(special) + ", ") and long.tokens <= budget.max_tokens
    # Special tags alone over the budget: kept whole, marked.
    many = [f"style_cluster_{n}" for n in range(budget.max_tokens)]
    over = budget.fit(many, ["a fox"], ["snow"])
    assert over.over and over.text == ", ".join(many)


def test_token_stats_summarise_lengths() -> None:
    budget = TokenBudget(auraflow_tokenizer(), V7)
    stats = TokenStats(budget.max_tokens)
    for n in range(1, 101):
        stats.add(budget.fit(["score_9"], [" ".join(_words(n))], _words(300) if n == 100 else []))
    d = stats.as_dict()
    assert d["prompts"] == 100 and d["cut"] == 1 and d["min"] < d["median"] < d["p95"] <= d["max"] <= 256


def test_the_sampler_refuses_an_unknown_palette_colour_naming_the_field() -> None:
    with pytest.raises(InvalidArgument) as err:
        PromptTags(palette=("red", "palette_blue", "chartreuse")).validate()
    assert err.value.field == "tags.palette[2]" and "chartreuse" in err.value.message
