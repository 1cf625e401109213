"""Table-driven tests of the safety rules: codex (names, aliases, spelling variants), tags, ratings, decisions."""

from __future__ import annotations

import numpy as np
import pytest

from services.safety.codex import Codex, CodexCharacter, CodexFormatError, normalize_name, parse_codex
from services.safety.policy import ALLOW, BLOCK, Policy, SafetyInput
from services.safety.tag_rules import Rating, load_tag_rules, normalize_tag

CODEX = Codex(
    7,
    (
        CodexCharacter("Twilight Sparkle", ("Princess Twilight",), "My Little Pony", "adult"),
        CodexCharacter("Sweetie Belle", ("Sweetie",), "My Little Pony", "minor"),
        CodexCharacter("Famous Singer", (), "", "adult", real_person=True),
        CodexCharacter("Mystery Mare", (), "Fan Works", "ambiguous"),
        CodexCharacter("Dr. Whooves", ("Doctor Whooves",), "My Little Pony", "adult"),
    ),
)
RULES = load_tag_rules()
SAFE_SCORES = np.array([0.9, 0.05, 0.05])
QUESTIONABLE_SCORES = np.array([0.3, 0.6, 0.1])
EXPLICIT_SCORES = np.array([0.1, 0.2, 0.7])


def item(**kw) -> SafetyInput:
    for key in ("tags", "characters"):
        if key in kw:
            kw[key] = tuple(kw[key])
    return SafetyInput(**kw)


CASES = [
    # (id, item, classifier scores, rating, decision, rule ids, matched, unknown)
    ("adult_explicit_allowed", item(characters=["Twilight Sparkle"], tags=["rating_explicit"]), None,
     "explicit", ALLOW, ["policy.allow"], ["Twilight Sparkle"], []),
    ("underscore_variant", item(characters=["Twilight_Sparkle"]), None, "safe", ALLOW, ["policy.allow"],
     ["Twilight Sparkle"], []),
    ("spacing_and_case_variant", item(characters=["  twilight   SPARKLE "]), None, "safe", ALLOW, ["policy.allow"],
     ["Twilight Sparkle"], []),
    ("alias_variant", item(characters=["princess_twilight"]), None, "safe", ALLOW, ["policy.allow"],
     ["Twilight Sparkle"], []),
    ("minor_explicit_blocked", item(characters=["Sweetie Belle"], tags=["rating_explicit"]), None,
     "explicit", BLOCK, ["codex.minor_explicit"], ["Sweetie Belle"], []),
    ("minor_by_alias_underscore_case", item(characters=["SWEETIE"], tags=["nude"]), None,
     "explicit", BLOCK, ["codex.minor_explicit"], ["Sweetie Belle"], []),
    ("minor_as_booru_tag", item(tags=["sweetie_belle", "rating_explicit"]), None,
     "explicit", BLOCK, ["codex.minor_explicit"], ["Sweetie Belle"], []),
    ("minor_named_in_prompt_text", item(caption="score_9, Sweetie  Belle, explicit, solo"), None,
     "explicit", BLOCK, ["codex.minor_explicit"], ["Sweetie Belle"], []),
    ("minor_with_explicit_classifier", item(characters=["sweetie belle"], caption="a pony"), EXPLICIT_SCORES,
     "explicit", BLOCK, ["codex.minor_explicit"], ["Sweetie Belle"], []),
    ("minor_questionable_flagged_not_blocked", item(characters=["Sweetie Belle"], tags=["swimsuit"]), None,
     "questionable", ALLOW, ["policy.allow"], ["Sweetie Belle"], []),
    ("minor_safe_allowed", item(characters=["Sweetie Belle"], tags=["rating_safe"]), SAFE_SCORES,
     "safe", ALLOW, ["policy.allow"], ["Sweetie Belle"], []),
    ("real_person_explicit_blocked", item(characters=["famous_singer"], tags=["rating_explicit"]), None,
     "explicit", BLOCK, ["codex.real_person_explicit"], ["Famous Singer"], []),
    ("real_person_safe_allowed", item(characters=["Famous Singer"]), SAFE_SCORES, "safe", ALLOW, ["policy.allow"],
     ["Famous Singer"], []),
    ("ambiguous_explicit_blocked", item(characters=["mystery mare"], tags=["explicit"]), None,
     "explicit", BLOCK, ["codex.ambiguous_explicit"], ["Mystery Mare"], []),
    ("blocked_tag_blocks_safe_content", item(tags=["Loli"], caption="a cute pony"), SAFE_SCORES,
     "safe", BLOCK, ["tags.blocked"], [], []),
    ("blocked_tag_in_prompt_list", item(caption="score_9, cub , solo"), None, "safe", BLOCK, ["tags.blocked"], [], []),
    ("blocked_word_in_free_text_is_not_a_tag", item(caption="a lion cub in the grass"), None, "safe", ALLOW,
     ["policy.allow"], [], []),
    ("blocked_and_minor_explicit_both_named", item(tags=["shota", "rating_explicit"], characters=["Sweetie"]), None,
     "explicit", BLOCK, ["tags.blocked", "codex.minor_explicit"], ["Sweetie Belle"], []),
    ("unknown_reported_never_guessed", item(characters=["Twilight Sparkles", "Sweetie-Bell"], tags=["explicit"]), None,
     "explicit", ALLOW, ["policy.allow"], [], ["Twilight Sparkles", "Sweetie-Bell"]),
    ("punctuation_in_names", item(characters=["dr_whooves"], caption="doctor whooves, safe"), None, "safe", ALLOW,
     ["policy.allow"], ["Dr. Whooves"], []),
    ("classifier_raises_rating_over_tags", item(tags=["rating_safe"], caption="pony"), EXPLICIT_SCORES,
     "explicit", ALLOW, ["policy.allow"], [], []),
    ("tags_raise_rating_over_classifier", item(tags=["rating_explicit"], caption="pony"), SAFE_SCORES,
     "explicit", ALLOW, ["policy.allow"], [], []),
    ("classifier_questionable", item(caption="pony"), QUESTIONABLE_SCORES, "questionable", ALLOW, ["policy.allow"],
     [], []),
    ("explicit_word_in_free_text", item(caption="a nude figure study"), None, "explicit", ALLOW, ["policy.allow"],
     [], []),
]  # fmt: skip


@pytest.mark.parametrize(
    ("item_", "scores", "rating", "decision", "rules", "matched", "unknown"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_codex_and_tag_rules(item_, scores, rating, decision, rules, matched, unknown) -> None:
    verdict = Policy().decide(item_, scores, CODEX, RULES)
    assert verdict.rating.label == rating
    assert verdict.decision == decision
    assert [r.rule_id for r in verdict.reasons] == rules
    assert all("codex v7" in r.message for r in verdict.reasons)
    assert verdict.matched_characters == matched
    assert verdict.unknown_characters == unknown
    assert verdict.codex_version == 7
    assert ("codex.unknown_character" in verdict.flags) == bool(unknown)


def test_flags_say_where_the_rating_came_from() -> None:
    v = Policy().decide(item(characters=["Sweetie Belle"], tags=["swimsuit"]), QUESTIONABLE_SCORES, CODEX, RULES)
    assert v.flags == ["tags.questionable", "classifier.questionable", "codex.minor_questionable"]
    assert v.rating_scores == pytest.approx(tuple(QUESTIONABLE_SCORES))


def test_ambiguous_explicit_can_be_configured_to_flag_instead_of_block() -> None:
    v = Policy(ambiguous_explicit="flag").decide(item(characters=["Mystery Mare"], tags=["nude"]), None, CODEX, RULES)
    assert v.decision == ALLOW and "codex.ambiguous_explicit" in v.flags
    with pytest.raises(ValueError, match="ambiguous_explicit"):
        Policy(ambiguous_explicit="allow")


@pytest.mark.parametrize(
    ("scores", "explicit_t", "questionable_t", "rating"),
    [
        ([0.2, 0.3, 0.5], 0.5, 0.5, Rating.EXPLICIT),
        ([0.2, 0.4, 0.4], 0.5, 0.5, Rating.QUESTIONABLE),  # q + e = 0.8 >= 0.5
        ([0.6, 0.3, 0.1], 0.5, 0.5, Rating.SAFE),
        ([0.6, 0.3, 0.1], 0.05, 0.5, Rating.EXPLICIT),
        ([0.6, 0.3, 0.1], 0.5, 0.35, Rating.QUESTIONABLE),
    ],
)
def test_classifier_thresholds(scores, explicit_t, questionable_t, rating) -> None:
    assert Policy(explicit_t, questionable_t).classifier_rating(np.array(scores)) == rating


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ("Twilight_Sparkle", "twilight sparkle"),
        ("twilight  sparkle", "twilight sparkle"),
        ("  TWILIGHT\tSparkle ", "twilight sparkle"),
        ("Twilight__Sparkle", "twilight sparkle"),
        ("Ｔｗｉｌｉｇｈｔ Sparkle", "twilight sparkle"),  # full-width letters (NFKC)
    ],
)
def test_name_normalisation(raw: str, key: str) -> None:
    assert normalize_name(raw) == key
    assert CODEX.lookup(raw) is not None and CODEX.lookup(raw).name == "Twilight Sparkle"


def test_tag_normalisation() -> None:
    assert normalize_tag(" Rating_Explicit ") == "rating explicit"


BAD_CODEX = [
    ("not: [valid", "not valid YAML"),
    ("- a\n- b", "expected a mapping with a 'characters' list"),
    ("characters: {name: x}", "'characters' must be a list"),
    ("characters: [{name: ''}]", "characters[0].name: must be a non-empty string"),
    ("characters: [{name: X}]", "characters[0].age_class: missing"),
    ("characters: [{name: X, age_class: teen}]", "characters[0].age_class: 'teen' is not one of"),
    ("characters: [{name: X, age_class: adult, real_person: maybe}]", "characters[0].real_person: must be true"),
    ("characters: [{name: X, age_class: adult, aliases: x}]", "characters[0].aliases: must be a list"),
    ("characters: [{name: X, age_class: adult, colour: red}]", "unknown key 'colour'"),
    ("characters: [{name: A B, age_class: adult}, {name: a_b, age_class: minor}]", "is the same name as"),
    ("characters: [{name: A, age_class: adult, aliases: [Zed]}, {name: zed, age_class: minor}]", "is the same name"),
    ("extra: 1\ncharacters: []", "unknown top-level key 'extra'"),
]


@pytest.mark.parametrize(("text", "message"), BAD_CODEX)
def test_bad_codex_files_are_refused_with_one_line(text: str, message: str) -> None:
    with pytest.raises(CodexFormatError) as err:
        parse_codex(text, source="c.yaml")
    assert message in str(err.value) and str(err.value).startswith("c.yaml")
    assert "\n" not in str(err.value)


def test_codex_file_parses_and_drops_duplicate_aliases() -> None:
    chars = parse_codex(
        "characters:\n"
        "  - {name: Twilight Sparkle, aliases: [twilight_sparkle, Princess Twilight],\n"
        "     franchise: MLP, age_class: adult}\n"
        "  - {name: Apple Bloom, age_class: minor, real_person: false}\n"
    )
    assert chars == [
        CodexCharacter("Twilight Sparkle", ("Princess Twilight",), "MLP", "adult"),
        CodexCharacter("Apple Bloom", (), "", "minor"),
    ]
