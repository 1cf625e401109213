"""The style-adherence report's data model: grid cells, per-image judgements, aggregates, locking figures, version
summary and the comparison of two reports; frozen dataclasses with `to_dict()` / `from_dict()` for JSON.

Definitions (computed in `services.trainer.evaluation.locking`):
- an image *follows* its style request when the style tagger assigns it the requested cluster;
- miss rate m(c, s) = share of images of content c and style s that do not follow s;
- the style's rate over all contents m(s) = mean over contents of m(c, s);
- locking index L(c) = mean over styles s of (m(c, s) - m(s)), in [-1, 1]; > 0: content c overrides style requests
  more often than the average content does (c "locks" a style);
- summary locking = mean over contents of max(L(c), 0).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from functools import cache
from typing import Any, Literal, Self, TypeVar

StyleKind = Literal["cluster", "source", "word"]
STYLE_KINDS: tuple[str, ...] = ("cluster", "source", "word")
REPORT_SCHEMA = 1

T = TypeVar("T", bound="Record")


class Record:
    """Mixin: `to_dict()` gives JSON-ready dicts (tuples -> lists, nested records -> dicts); `from_dict()` reverses."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _dump(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        hints = _hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name in data:
                kwargs[f.name] = _load(hints[f.name], data[f.name])
        return cls(**kwargs)


def _dump(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, tuple | list):
        return [_dump(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    return value


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _load(tp: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _load(inner[0], value) if len(inner) == 1 else value
    if origin is tuple:
        item = args[0] if args else Any
        return tuple(_load(item, v) for v in value)
    if origin is dict:
        return {k: _load(args[1], v) for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Record):
        return tp.from_dict(value)
    if tp is float and isinstance(value, int):
        return float(value)
    return value


@dataclasses.dataclass(frozen=True)
class ContentPrompt(Record):
    """One content prompt of the grid: `content_id` is stable across runs (e.g. `portrait`, `character_1`)."""

    content_id: str
    text: str
    kind: str = ""  # portrait | full_body | close_up | landscape | object | character | scene | animal


@dataclasses.dataclass(frozen=True)
class StyleRequest(Record):
    """A style the prompt asks for. kind `cluster`: value `style_cluster_N`, `cluster` = N; kind `source`: value
    `source_anime` etc.; kind `word`: a plain style phrase (`watercolor painting`). `tags` is what the request adds
    to the prompt. `cluster` is the style-tagger cluster the request is judged against: the cluster's own number for
    kind `cluster`, for the others the cluster the style tagger assigns most often to that request over the whole
    grid (resolved by the judge, None until then)."""

    style_id: str
    kind: StyleKind
    value: str
    tags: tuple[str, ...] = ()
    cluster: int | None = None
    family: str = ""  # the cluster's family as the style tagger lists it (family-prefixed tag formats)


@dataclasses.dataclass(frozen=True)
class Adapter(Record):
    name: str
    weight: float = 1.0
    version: int = 0  # the sampler's adapter version; 0 = the newest


@dataclasses.dataclass(frozen=True)
class GridCell(Record):
    """One image of the grid: content x style x score tags on/off x seed; `prompt` is the exact text sent."""

    cell_id: str  # f"{content_id}|{style_id}|{'st' if score_tags else 'nost'}|{seed}"
    content_id: str
    content_text: str
    style: StyleRequest
    score_tags: bool
    seed: int
    prompt: str
    negative_prompt: str = ""

    @property
    def group_key(self) -> tuple[str, str, bool]:
        """The cell without its seed: images that differ only by seed aggregate under this key."""
        return (self.content_id, self.style.style_id, self.score_tags)


@dataclasses.dataclass(frozen=True)
class ImageJudgement(Record):
    """What our services said about one generated image."""

    cell_id: str
    assigned_cluster: int  # the style tagger's cluster for the image
    requested_cluster: int | None  # the request's cluster (None: unresolved -> not followed)
    cluster_distance: float  # cosine distance of the image's style embedding to the requested cluster's centroid
    followed: bool  # assigned_cluster == requested_cluster
    content_similarity: float  # CLIP cosine similarity of image and content prompt text
    aesthetic_score: float  # scorer, 0..1
    image_uri: str = ""  # blob URL of the PNG (pony_common.blobs); "" when not stored
    image_sha256: str = ""
    seconds: float = 0.0  # generation time of this image


@dataclasses.dataclass(frozen=True)
class CellAggregate(Record):
    """Images of one (content, style, score tags) over its seeds."""

    content_id: str
    style_id: str
    score_tags: bool
    n: int
    follow_rate: float
    mean_distance: float
    mean_content_similarity: float
    mean_aesthetic: float
    cell_ids: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ContentLocking(Record):
    """Locking figures of one content prompt (see the module docstring). `locked`: index above the report's
    `lock_threshold`."""

    content_id: str
    content_text: str
    n: int
    miss_rate: float  # mean over styles of m(c, s)
    expected_miss_rate: float  # mean over styles of m(s)
    locking_index: float  # miss_rate - expected_miss_rate
    locked: bool
    worst_style_id: str = ""  # the style with the largest m(c, s) - m(s)


@dataclasses.dataclass(frozen=True)
class StyleFollowRate(Record):
    style_id: str
    kind: StyleKind
    value: str
    n: int
    follow_rate: float  # 1 - m(s)
    mean_distance: float


@dataclasses.dataclass(frozen=True)
class ScoreTagEffect(Record):
    """Aesthetic score with vs without score tags; `content_id` "" is the whole grid. Pairs share content, style
    and seed."""

    content_id: str
    n_pairs: int
    mean_with: float
    mean_without: float
    delta: float  # mean_with - mean_without
    win_rate: float  # share of pairs where the score-tagged image scores higher


@dataclasses.dataclass(frozen=True)
class VersionSummary(Record):
    """The figures one model version is compared on."""

    model: str
    version: int | None
    adapters: tuple[Adapter, ...]
    n_images: int
    follow_rate: float
    locking: float  # mean over contents of max(L(c), 0)
    max_locking: float
    locked_contents: tuple[str, ...]
    mean_content_similarity: float
    score_tag_delta: float


@dataclasses.dataclass(frozen=True)
class Cost(Record):
    images: int
    seconds: float  # wall time of the whole evaluation
    generate_seconds: float  # sum of per-image generation time
    judge_seconds: float


@dataclasses.dataclass(frozen=True)
class Report(Record):
    """One style-adherence evaluation of one model version (+ adapters)."""

    evaluation_id: str
    model: str
    version: int | None
    adapters: tuple[Adapter, ...]
    created_at: str  # ISO 8601 UTC
    contents: tuple[ContentPrompt, ...]
    styles: tuple[StyleRequest, ...]
    cells: tuple[GridCell, ...]
    judgements: tuple[ImageJudgement, ...]
    aggregates: tuple[CellAggregate, ...]
    locking: tuple[ContentLocking, ...]
    style_rates: tuple[StyleFollowRate, ...]
    score_tag_effects: tuple[ScoreTagEffect, ...]  # first: the whole grid (content_id ""), then one per content
    summary: VersionSummary
    cost: Cost
    lock_threshold: float = 0.25
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)  # grid size, steps, resolution, ...
    schema: int = REPORT_SCHEMA

    def judgement(self, cell_id: str) -> ImageJudgement | None:
        return next((j for j in self.judgements if j.cell_id == cell_id), None)


@dataclasses.dataclass(frozen=True)
class Regression(Record):
    """One figure that got worse beyond the threshold. scope: summary | content | style; key: the figure
    (`locking`, `follow_rate`) for summary, the content/style id otherwise."""

    scope: Literal["summary", "content", "style"]
    key: str
    figure: str  # locking | locking_index | follow_rate
    base: float
    candidate: float
    delta: float
    message: str


@dataclasses.dataclass(frozen=True)
class Comparison(Record):
    """Candidate vs base report. `regressed`: any regression beyond `threshold`."""

    base: VersionSummary
    candidate: VersionSummary
    threshold: float
    locking_delta: float  # candidate.locking - base.locking (> 0: locks more)
    follow_rate_delta: float
    content_deltas: dict[str, float]  # content_id -> max(L_candidate(c), 0) - max(L_base(c), 0)
    style_deltas: dict[str, float]  # style_id -> follow-rate candidate - base
    regressions: tuple[Regression, ...]

    @property
    def regressed(self) -> bool:
        return bool(self.regressions)

    def reason(self) -> str:
        """One line naming the regressions ("" when none)."""
        return "; ".join(r.message for r in self.regressions)
