"""No spelling trick slips past safety: every spelling variant of a blocked tag (fullwidth, zero-width space, soft
hyphen, bidi controls, Cyrillic lookalikes, case, `_`/space/`-`) is blocked by the real safety service, benign
neighbours are not, and codex names and aliases match through the same normalisation (pony_common.textnorm)."""

from __future__ import annotations

import unicodedata
from collections.abc import Callable

import grpc
import pytest

from pony.v1 import safety_pb2, safety_pb2_grpc
from pony_common import textnorm
from pony_common.catalog.db import catalog_for
from pony_common.config import Settings
from pony_common.testing import serve
from services.safety.app import create_service
from services.safety.codex import Codex, CodexCharacter, CodexFormatError, check_unique
from services.safety.policy import BLOCK, Policy, SafetyInput
from services.safety.store import CodexStore
from services.safety.tag_rules import load_tag_rules

RULES = load_tag_rules()
# Three tags of services/safety/default_tag_rules.yaml's `blocked` list (one of them two words).
BLOCKED = ("loli", "shota", "child porn")

ZWSP, SOFT_HYPHEN, RLO, PDF, LRI, PDI, RLM, ALM = (
    "\u200b", "\u00ad", "\u202e", "\u202c", "\u2066", "\u2069", "\u200f", "\u061c"
)  # fmt: skip
# Latin letter -> its Cyrillic lookalike (а е о р с х у і ѕ һ ј), lower and upper case.
CYRILLIC = str.maketrans("aeopcxyishjAEOPCXYISHJT", "аеорсхуіѕһјАЕОРСХУІЅҺЈТ")


def fullwidth(text: str) -> str:
    return "".join("\u3000" if c == " " else chr(ord(c) + 0xFEE0) for c in text)


def inside(mark: str) -> Callable[[str], str]:
    """`mark` between every two characters of the tag."""
    return lambda tag: mark.join(tag)


def middle(text: str, mark: str) -> str:
    half = len(text) // 2
    return text[:half] + mark + text[half:]


def mixed(text: str) -> str:
    """Cyrillic lookalikes where there are some, fullwidth letters elsewhere."""
    return "".join(c.translate(CYRILLIC) if c.translate(CYRILLIC) != c else fullwidth(c) for c in text)


VARIANTS: dict[str, Callable[[str], str]] = {
    "as_is": lambda t: t,
    "fullwidth": fullwidth,
    "fullwidth_upper": lambda t: fullwidth(t.upper()),
    "zero_width_space_inside": inside(ZWSP),
    "zero_width_joiner_and_word_joiner": lambda t: middle(t, "\u200d\u2060"),
    "bom_inside": lambda t: middle(t, "\ufeff"),
    "soft_hyphen_inside": inside(SOFT_HYPHEN),
    "rlo_wrapped": lambda t: f"{RLO}{t}{PDF}",
    "lri_isolate_inside": lambda t: f"{t[:1]}{LRI}{t[1:-1]}{PDI}{t[-1:]}",
    "rlm_and_alm_inside": lambda t: middle(middle(t, RLM), ALM),
    "cyrillic_lookalikes": lambda t: t.translate(CYRILLIC),
    "cyrillic_lookalikes_upper": lambda t: t.upper().translate(CYRILLIC),
    "mixed_case": lambda t: "".join(c.upper() if i % 2 else c for i, c in enumerate(t)),
    "upper": str.upper,
    "mathematical_bold": lambda t: "".join(
        unicodedata.lookup(f"MATHEMATICAL BOLD SMALL {c.upper()}") if c.isalpha() else c for c in t
    ),
    "combining_marks": lambda t: "".join(c + "\u0336" if c.isalpha() else c for c in t),
    "everything_at_once": lambda t: middle(mixed(t.upper()), ZWSP + SOFT_HYPHEN + RLO),
    # Separator variants (the two-word tag shows them; a one-word tag keeps its letters).
    "underscore": lambda t: t.replace(" ", "_"),
    "hyphen": lambda t: t.replace(" ", "-"),
    "em_dash_and_spaces": lambda t: t.replace(" ", " \u2014 "),
    "padded_underscores": lambda t: f"__{t.replace(' ', '__')}_",
    "ideographic_space": lambda t: t.replace(" ", "\u3000"),
}

SEPARATOR_VARIANTS = ("underscore", "hyphen", "em_dash_and_spaces", "padded_underscores", "ideographic_space")
SPELLINGS = [
    (tag, name, make(tag))
    for tag in BLOCKED
    for name, make in VARIANTS.items()
    if " " in tag or name not in SEPARATOR_VARIANTS
]
SPELLING_IDS = [f"{tag.replace(' ', '_')}-{name}" for tag, name, _ in SPELLINGS]

# Text that must stay allowed: the blocked words inside longer words, in free text, and ordinary non-Latin text.
BENIGN = [
    "grape juice, drapery",  # contains "rape"
    "cubism, a cubicle",  # contains "cub"
    "a lion cub in the grass",  # a blocked word in free text is not a tag
    "shotgun, lolita fashion",  # start like "shota", "loli"
    "children's book illustration, child portrait",
    "初音ミク, 東方Project",  # Japanese character and franchise names
    "トワイライトスパークル, ｽﾊﾟｰｸﾙ",  # katakana, halfwidth katakana
    "кот на крыше, Καλημέρα",  # Russian, Greek
    "lolo, shot a, child pom",  # one letter away
]


def test_the_blocked_tags_chosen_are_in_the_default_rules() -> None:
    assert set(BLOCKED) <= RULES.blocked


@pytest.mark.parametrize(("tag", "variant", "spelled"), SPELLINGS, ids=SPELLING_IDS)
def test_every_spelling_has_the_blocked_tags_key(tag: str, variant: str, spelled: str) -> None:
    assert (spelled == tag) == (variant == "as_is")
    assert textnorm.tag_key(spelled) == textnorm.tag_key(tag)
    match = RULES.match([spelled])
    assert match.blocked == (tag,)  # reported by the rule's spelling, not the caller's
    assert RULES.match([], caption=f"score_9, {spelled}, solo").blocked == (tag,)


@pytest.mark.parametrize("text", BENIGN)
def test_benign_neighbours_are_not_blocked(text: str) -> None:
    assert RULES.match(text.split(", "), caption=text).blocked == ()


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ("ｌｏｌｉ", "loli"),
        ("LoLi", "loli"),
        ("l\u200bo\u200cl\u200di\u2060\ufeff", "loli"),
        ("lo\u00adli", "loli"),
        ("\u202alo\u202b\u202cl\u202d\u202ei\u2066\u2067\u2068\u2069\u200e\u200f\u061c", "loli"),
        ("lo\U000e0041li\ufe0f", "loli"),  # a tag character and a variation selector
        ("l\u043el\u0456", "loli"),  # Cyrillic о, і
        ("\u0422\u041e\u0414DLERCON".replace("\u0414", "D"), "toddlercon"),  # Cyrillic capital Т, О
        ("l0l1", "l0l1"),  # ASCII is only case folded: no leetspeak guessing,
        ("pom poms, 1girl", "pom poms, 1girl"),  # nor the skeleton's m -> rn, 1 -> l
        ("blocked_tag", "blocked tag"),
        ("blocked-tag", "blocked tag"),
        ("  Blocked \t tag ", "blocked tag"),
        ("blocked\u2010tag", "blocked tag"),  # Unicode hyphen
        ("Ｔｗｉｌｉｇｈｔ＿Ｓｐａｒｋｌｅ", "twilight sparkle"),
        ("初音ミク", "初音ミク"),  # non-Latin text keeps its letters
        ("ガ", "ガ"),  # a mark on a non-Latin letter stays
        ("café", "cafe"),  # a mark on a Latin letter goes
    ],
)
def test_tag_keys(raw: str, key: str) -> None:
    assert textnorm.tag_key(raw) == key


def test_fold_removes_every_invisible_character_the_rules_could_be_fooled_by() -> None:
    for ch in textnorm.ZERO_WIDTH + textnorm.SOFT_HYPHEN + textnorm.BIDI_CONTROLS:
        assert textnorm.fold(f"a{ch}b") == "ab", f"U+{ord(ch):04X}"
    format_chars = [chr(cp) for cp in range(0x110000) if unicodedata.category(chr(cp)) == "Cf"]
    assert len(format_chars) > 100  # Unicode 14 has 163
    assert textnorm.fold("x".join(format_chars)) == "x" * (len(format_chars) - 1)


def test_fold_is_idempotent_and_keeps_ascii_words_apart() -> None:
    bmp = [chr(cp) for cp in range(0x10000) if not 0xD800 <= cp <= 0xDFFF]
    for ch in bmp:
        once = textnorm.fold(f"a{ch}\u0301b")
        assert textnorm.fold(once) == once, f"U+{ord(ch):04X}"
    # The ASCII fast path and the general path agree.
    for word in ("Loli Shota", "rating_explicit", "score_9, m0m 1", "Twilight's"):
        assert textnorm.fold(word) == textnorm.fold(word + "\u200b")


def test_only_comparison_keys_are_normalised_never_what_the_caller_reads() -> None:
    caption = "score_9, ｌｏｌｉ, 初音ミク"
    item = SafetyInput(caption=caption, tags=("Ｌｏ\u200bｌｉ",))
    verdict = Policy().decide(item, None, Codex(3), RULES)
    assert item.caption == caption and item.tags == ("Ｌｏ\u200bｌｉ",)
    assert verdict.decision == BLOCK
    assert [r.message for r in verdict.reasons] == ["blocked tag 'loli' (codex v3)"]


def test_split_tags_cuts_at_every_comma_form() -> None:
    assert textnorm.split_tags("a pony，ＬＯＬＩ、 b ، c ﹐d,, ") == ["a pony", "loli", "b", "c", "d"]


CHARACTERS = [
    CodexCharacter("Sweetie Belle", ("Sweetie", "スウィーティー・ベル"), "My Little Pony", "minor"),
    CodexCharacter("Twilight Sparkle", ("Princess Twilight",), "My Little Pony", "adult"),
]
NAME_SPELLINGS = [
    "Sweetie Belle",
    "ＳＷＥＥＴＩＥ＿ＢＥＬＬＥ",
    "Swee\u200btie Be\u00adlle",
    "\u202eSweetie Belle\u202c",
    "Sweetie Belle".translate(CYRILLIC),
    "sweetie-belle",
    "SWEETIE",
    "ｽｳｨｰﾃｨｰ･ﾍﾞﾙ",  # the Japanese alias in halfwidth katakana
    "スウィーティー\u200b・ベル",
]


@pytest.mark.parametrize("name", NAME_SPELLINGS)
def test_codex_names_and_aliases_match_through_the_same_normalisation(name: str) -> None:
    codex = Codex(1, tuple(CHARACTERS))
    assert codex.lookup(name) is CHARACTERS[0]
    assert codex.find_in_text(f"score_9, {name}, standing in a field") == [CHARACTERS[0]]
    verdict = Policy().decide(SafetyInput(characters=(name,), tags=("rating_explicit",)), None, codex, RULES)
    assert [r.rule_id for r in verdict.reasons] == ["codex.minor_explicit"]
    assert verdict.matched_characters == ["Sweetie Belle"] and verdict.unknown_characters == []


def test_a_codex_refuses_two_characters_whose_names_are_only_spelled_apart() -> None:
    twin = CodexCharacter("Ѕwееtіе Bеllе", (), "Fakes", "adult")  # Cyrillic lookalikes of another's name
    with pytest.raises(CodexFormatError, match="is the same name as"):
        check_unique([CHARACTERS[0], twin], "import")


def test_unknown_names_are_reported_once_however_spelled() -> None:
    item = SafetyInput(characters=("Rarity", "ＲＡＲＩＴＹ", "Rar\u200bity", "\u200b"))
    verdict = Policy().decide(item, None, Codex(1, tuple(CHARACTERS)), RULES)
    assert verdict.unknown_characters == ["Rarity"]


def test_the_real_safety_service_blocks_every_spelling_and_allows_the_neighbours(model_settings: Settings) -> None:
    store = CodexStore(catalog_for(model_settings.database_url))
    store.import_characters(CHARACTERS)
    items = [
        safety_pb2.SafetyItem(item_id=f"tag-{i}", tags=[spelled], caption="a pony")
        for i, (_, _, spelled) in enumerate(SPELLINGS)
    ]
    items += [
        safety_pb2.SafetyItem(item_id=f"prompt-{i}", caption=f"score_9, source_pony, {spelled}, standing")
        for i, (_, _, spelled) in enumerate(SPELLINGS)
    ]
    items += [safety_pb2.SafetyItem(item_id=f"benign-{i}", caption=text) for i, text in enumerate(BENIGN)]
    items += [
        safety_pb2.SafetyItem(item_id=f"name-{i}", characters=[name], tags=["rating_explicit"])
        for i, name in enumerate(NAME_SPELLINGS)
    ]
    items += [
        safety_pb2.SafetyItem(item_id=f"named-{i}", caption=f"score_9, {name}, explicit")
        for i, name in enumerate(NAME_SPELLINGS)
    ]
    settings = model_settings.replace(safety_max_batch=len(items))
    with (
        serve(settings, create_service(settings), ready_timeout=60) as served,
        grpc.insecure_channel(served.address) as ch,
    ):
        response = safety_pb2_grpc.SafetyStub(ch).Check(safety_pb2.CheckRequest(items=items), timeout=120)
    results = {r.item_id: r for r in response.results}
    assert len(results) == len(items)
    for i, (tag, variant, spelled) in enumerate(SPELLINGS):
        for kind in ("tag", "prompt"):
            r = results[f"{kind}-{i}"]
            assert r.decision == safety_pb2.DECISION_BLOCK, (kind, tag, variant, spelled)
            assert [x.rule_id for x in r.reasons] == ["tags.blocked"]
            assert f"blocked tag {tag!r}" in r.reasons[0].message
    for i, text in enumerate(BENIGN):
        r = results[f"benign-{i}"]
        assert r.decision == safety_pb2.DECISION_ALLOW, text
    for i, name in enumerate(NAME_SPELLINGS):
        for kind in ("name", "named"):
            r = results[f"{kind}-{i}"]
            assert r.decision == safety_pb2.DECISION_BLOCK, (kind, name)
            assert [x.rule_id for x in r.reasons] == ["codex.minor_explicit"]
            assert list(r.matched_characters) == ["Sweetie Belle"] and not r.unknown_characters
