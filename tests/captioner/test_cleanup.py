"""Caption clean-up and prompts: fillers, artist scrubbing that spares character names, guaranteed character
names, length and whitespace, templates filled with tags and names, few-shot examples and their version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.captioner.cleanup import CaptionCleaner, display_name, normalise_whitespace, truncate
from services.captioner.prompts import KIND_SPECS, PromptBook, split_artist_tags

SHORT, MEDIUM, LONG, STYLE = (KIND_SPECS[k] for k in ("short", "medium", "long", "style"))


@pytest.fixture
def cleaner() -> CaptionCleaner:
    shipped = CaptionCleaner.load()
    return CaptionCleaner(shipped.fillers, ["Sparkle", "John Doe", "jdoe_art"])


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("The image depicts a pony in a field.", "A pony in a field."),
        ("In this image, we can see a fox. This image shows a tree.", "A fox. A tree."),
        ("THIS IMAGE SHOWS: a castle at night", "A castle at night."),
        ("An image of a dragon on a hill.", "A dragon on a hill."),
        ("The imagery of the dragon is bold.", "The imagery of the dragon is bold."),
    ],
)
def test_filler_openings_are_removed_from_each_sentence(cleaner: CaptionCleaner, raw: str, expected: str) -> None:
    assert cleaner.clean(raw, MEDIUM) == expected


def test_filler_list_is_configurable(tmp_path: Path) -> None:
    fillers = tmp_path / "fillers.txt"
    fillers.write_text("# ours\nbehold\n", encoding="utf-8")
    cleaner = CaptionCleaner.load(fillers)
    assert cleaner.clean("Behold, a pony. The image depicts a cat.", MEDIUM) == "A pony. The image depicts a cat."


def test_artist_names_and_their_attribution_are_scrubbed(cleaner: CaptionCleaner) -> None:
    raw = "A pony reading, drawn by John Doe. Art by jdoe_art. In the style of john doe, a pony sleeps. @JDoe_Art"
    assert cleaner.clean(raw, MEDIUM) == "A pony reading. A pony sleeps."


def test_a_character_name_that_contains_or_equals_an_artist_name_survives(cleaner: CaptionCleaner) -> None:
    # "Sparkle" is a blocklisted artist, but "Twilight Sparkle" is this item's character
    raw = "Twilight Sparkle reads a book by Sparkle."
    assert cleaner.clean(raw, MEDIUM, characters=["twilight_sparkle"]) == "Twilight Sparkle reads a book."
    # an artist name that IS one of the item's characters is not scrubbed at all
    assert cleaner.clean("Sparkle waves.", MEDIUM, characters=["Sparkle"]) == "Sparkle waves."
    assert cleaner.clean("A pony by Bob Ross.", MEDIUM, characters=["Bob Ross"], artists=["Bob Ross"]) == (
        "A pony by Bob Ross."
    )


def test_item_artists_are_scrubbed_too(cleaner: CaptionCleaner) -> None:
    assert cleaner.clean("A fox by somebody_else in warm light", LONG, artists=["Somebody Else"]) == (
        "A fox in warm light."
    )


def test_missing_character_names_are_put_in_front_of_content_captions(cleaner: CaptionCleaner) -> None:
    assert cleaner.clean("a pony in a field", SHORT, characters=["rainbow_dash", "Spike", "rarity_(mlp)"]) == (
        "Rainbow Dash, Spike and Rarity: A pony in a field."
    )
    # a name already there is written in its display form and not repeated
    assert cleaner.clean("rainbow dash's wings glow.", MEDIUM, characters=["rainbow_dash"]) == (
        "Rainbow Dash's wings glow."
    )
    assert cleaner.clean("The image depicts", MEDIUM, characters=["Rarity"]) == "Rarity."
    assert cleaner.clean("The image depicts", MEDIUM) == ""


def test_style_captions_carry_no_character_names(cleaner: CaptionCleaner) -> None:
    raw = "Twilight Sparkle in soft watercolor with thin lines."
    assert cleaner.clean(raw, STYLE, characters=["twilight_sparkle"]) == "In soft watercolor with thin lines."


def test_short_captions_keep_one_sentence_and_lengths_are_capped(cleaner: CaptionCleaner) -> None:
    assert cleaner.clean("A pony runs. It is fast. Very fast.", SHORT) == "A pony runs."
    long = " ".join(f"Sentence number {i} is here." for i in range(400))
    out = cleaner.clean(long, LONG)
    assert len(out) <= LONG.max_chars and out.endswith(".")
    assert truncate("word " * 50, 23) == "word word word word."


def test_whitespace_and_punctuation_are_normalised() -> None:
    assert normalise_whitespace("  a   pony ,  running ! ! !  ( ) fast ,.") == "a pony, running! fast."


def test_display_name() -> None:
    assert display_name("twilight_sparkle_(mlp)") == "Twilight Sparkle"
    assert display_name("Princess Luna") == "Princess Luna"
    assert display_name("DJ_Pon-3") == "DJ Pon-3"


def test_prompt_templates_are_filled_with_tags_and_characters() -> None:
    book = PromptBook.load()
    tags, artists = split_artist_tags(["pony", "blue_sky", "artist:some_one", "score_9", "rating_safe", "pony"])
    assert artists == ["some_one"]
    prompt = book.prompt("medium", tags, ["Twilight Sparkle"])
    assert "Characters: Twilight Sparkle." in prompt
    assert "pony, blue sky." in prompt
    assert "score_9" not in prompt and "rating" not in prompt and "some_one" not in prompt
    style = book.prompt("style", tags, ["Twilight Sparkle"])
    assert "Twilight Sparkle" not in style and "medium, the technique" in style
    assert all(kind_prompt.count("\n- ") == 2 for kind_prompt in (prompt, style))  # two examples each


def test_few_shot_file_comes_from_config_and_changes_the_template_version(tmp_path: Path) -> None:
    shipped = PromptBook.load()
    path = tmp_path / "examples.json"
    path.write_text(json.dumps({"short": ["A blue pony naps under an oak tree."]}), encoding="utf-8")
    ours = PromptBook.load(path, per_prompt=2)
    assert "- A blue pony naps under an oak tree." in ours.prompt("short")
    assert "\n- " not in ours.prompt("long")
    assert ours.version != shipped.version and ours.version.startswith("captions-1+")
    assert PromptBook.load(path).version == ours.version
    path.write_text(json.dumps({"tiny": ["x"]}), encoding="utf-8")
    with pytest.raises(ValueError, match="unknown caption kinds"):
        PromptBook.load(path)


def test_settings_name_the_example_filler_and_blocklist_files(tmp_path: Path) -> None:
    from pony_common.config import Settings
    from services.captioner.service import CaptionerService

    (tmp_path / "ex.json").write_text(json.dumps({"style": ["Ink wash, loose brushwork."]}), encoding="utf-8")
    (tmp_path / "fill.txt").write_text("lo and behold\n", encoding="utf-8")
    (tmp_path / "artists.txt").write_text("# blocked\nSome Artist\n", encoding="utf-8")
    settings = Settings.from_env(
        {
            "PONY_CAPTIONER_FEWSHOT_PATH": str(tmp_path / "ex.json"),
            "PONY_CAPTIONER_FILLER_PATH": str(tmp_path / "fill.txt"),
            "PONY_ARTIST_BLOCKLIST_PATH": str(tmp_path / "artists.txt"),
        },
        state_dir=str(tmp_path / "state"),
    )
    captioner = CaptionerService.from_settings(settings)  # nothing loads until load()
    assert not captioner.model.ready
    assert captioner.template_version == PromptBook.load(tmp_path / "ex.json").version
    assert "Ink wash" in captioner.prompts.prompt("style")
    assert captioner.cleaner.clean("Lo and behold, a cat by some_artist.", MEDIUM) == "A cat."
