"""Export rows and V7 prompts: special tags in V7 order, content tags without the artist, the assembled prompt."""

from __future__ import annotations

import json

from pony_common.prompts import assemble_prompt, rating_tag, source_tag, special_tags
from services.curation.export import manifest_row
from services.curation.records import ImageRecord


def _record(**overrides) -> ImageRecord:
    values = dict(
        image_id="ab" * 32,
        blob_key="images/ab/x.png",
        width=64,
        height=48,
        format="PNG",
        category="anime",
        status="done",
        error=None,
        tags=["long hair", "smile", "kiraboshi", "artist:someone"],
        characters=["aoi hoshino"],
        artist="kiraboshi",
        source_site="danbooru",
        source_uri="/pool/a.png",
        dup_group=None,
        is_duplicate=False,
        captions={
            "short": "A girl.",
            "medium": "A girl with long hair smiles.",
            "long": "…",
            "style": "Soft cel shading.",
        },
        score=0.83,
        score_tag="score_8",
        style_tag="style_cluster_3",
        style_cluster=3,
        palette_tags=["palette_pink"],
        rating="safe",
        decision="allow",
    )
    values.update(overrides)
    return ImageRecord(**values)


def test_prompt_parts_and_order() -> None:
    assert source_tag("western") == "source_cartoon" and source_tag("other") is None
    assert rating_tag("explicit") == "rating_explicit" and rating_tag("unknown") is None
    assert special_tags("score_9, score_8_up", "style_cluster_1", "source_anime", "rating_safe") == [
        "score_9",
        "score_8_up",
        "style_cluster_1",
        "source_anime",
        "rating_safe",
    ]
    prompt = assemble_prompt(["score_8", "rating_safe"], "A cat.", "  Ink   lines. ", ["cat", "score_8", "cat", ""])
    assert prompt == "score_8, rating_safe, A cat., Ink lines., cat"


def test_manifest_row_has_the_trainer_columns_in_v7_order() -> None:
    row = manifest_row(_record(), "/out/images/x.png", 0)
    # Palette tags are special tags, after the rating (pony_common.prompts.base).
    assert row["special_tags"] == ["score_8", "style_cluster_3", "source_anime", "rating_safe", "palette_pink"]
    assert row["tags"] == ["aoi hoshino", "long hair", "smile"]  # no artist, characters first
    assert row["prompt"] == (
        "score_8, style_cluster_3, source_anime, rating_safe, palette_pink, A girl with long hair smiles., "
        "Soft cel shading., aoi hoshino, long hair, smile"
    )
    assert json.loads(row["captions"])["style"] == "Soft cel shading."
    # V6 tags true of a bucket-8 image: never score_9 (the old form claimed every image was a 9).
    assert row["score_tags_v6"] == ["score_8", "score_8_up", "score_7_up", "score_6_up", "score_5_up", "score_4_up"]
    assert (row["image_uri"], row["width"], row["height"], row["source"]) == ("/out/images/x.png", 64, 48, "danbooru")


def test_a_character_named_like_the_artist_keeps_its_tag() -> None:
    row = manifest_row(_record(characters=["kiraboshi"], style_tag=None, rating=None, score_tag=None), "u", 0)
    assert row["tags"][0] == "kiraboshi"
    assert row["special_tags"] == ["source_anime", "palette_pink"]
