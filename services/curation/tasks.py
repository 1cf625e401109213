"""The curation workflow by batches: caption -> score -> (style, safety) -> persist, one task per batch and stage.

A task takes the image ids of a batch (`curation_batch_size`), claims the (image, stage) rows not done yet in ONE
conditional statement (so a redelivered or resent batch does only the rest), makes ONE gRPC call for them with blob
keys (the services read the images; the worker reads no blob), and writes the results and completes the claimed
rows in one transaction of a few bulk statements. An image a service fails (its ItemError, or a whole call refused
for good, split until the bad image is alone) fails that stage alone with its reason; the rest of the batch goes on.
The score stage stores each image's CLIP embedding (kind `clip`); style and safety pass it to their services so the
image tower runs once per image. A service that is UNAVAILABLE (or a catalog that cannot be reached) parks the
batch: its claimed rows are `waiting` and it is retried with capped backoff for as long as the outage lasts.
No task stores a Celery result: the catalog is the state (`dispatch.wait_for_images` polls it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from celery import Task, chain, group
from celery.canvas import Signature
from sqlalchemy import bindparam, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from pony.v1 import (
    captioner_pb2,
    common_pb2,
    safety_pb2,
    scorer_pb2,
    style_tagger_pb2,
)
from pony_common.catalog.db import Catalog, bulk_upsert, catalog_for, id_in, upsert
from pony_common.catalog.models import (
    AestheticScoreRow,
    CaptionRow,
    EmbeddingRow,
    ImageRow,
    SafetyDecisionRow,
    StyleAssignmentRow,
    StyleClusterSetRow,
)
from pony_common.celery_app import current_settings, is_retryable, pony_task
from pony_common.config import Settings
from pony_common.errors import DependencyUnavailable
from services.captioner.client import CaptionerClient
from services.curation.duplicates import resolve_duplicates
from services.curation.rpc import ItemFailed, ask_batch
from services.curation.store import claim_batch, complete_batch, fail_batch, ledger, wait_batch
from services.safety.client import SafetyClient
from services.scorer.client import ScorerClient
from services.style_tagger.client import StyleTaggerClient

log = logging.getLogger(__name__)

STAGES = ("caption", "score", "style", "safety", "persist")
# The stages persist joins (every one final = the image is done, or failed with each failed stage's reason).
WORK_STAGES = ("caption", "score", "style", "safety")
PARALLEL_STAGES = ("style", "safety")
TASK_NAMES = {stage: f"pony.curation.{stage}" for stage in STAGES}
FINAL = ("done", "failed")
# Embedding kinds: the scorer's CLIP tower (computed once, shared by style and safety) and the style tagger's.
CLIP_KIND = "clip"
STYLE_KIND = "style"


def enum_name(enum: Any, value: int, prefix: str) -> str:
    """`RATING_SAFE` -> `safe` (empty for the UNSPECIFIED value)."""
    name = enum.Name(value)
    return "" if name.endswith("_UNSPECIFIED") else name.removeprefix(prefix).lower()


def caption_kind(value: int) -> str:
    return enum_name(captioner_pb2.CaptionKind, value, "CAPTION_KIND_")


def image_ref(_settings: Settings, row: Any) -> common_pb2.ImageRef:
    """The image as an ImageRef by blob key: the service reads it (the worker never does)."""
    return common_pb2.ImageRef(uri=row.blob_key, image_id=row.id)


def _vector(values: Any) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


def embedding_row(image_id: str, kind: str, values: Any, provenance: Any) -> dict[str, Any]:
    """An `embeddings` row (float32 little-endian bytes) for a bulk upsert."""
    return {
        "image_id": image_id,
        "kind": kind,
        "dim": len(values),
        "vector": _vector(values),
        "model": provenance.model,
        "model_version": provenance.model_version,
    }


def save_style_embedding(catalog: Catalog, image_id: str, values: Any, provenance: Any) -> None:
    """Upserts an image's style embedding (kind `style`; FitClusters clusters these)."""
    with catalog.session() as s:
        upsert(s, EmbeddingRow, embedding_row(image_id, STYLE_KIND, values, provenance), keys=("image_id", "kind"))


def style_tag_row(tag: Any) -> dict[str, Any]:
    return {
        "image_id": tag.image_id,
        "cluster_set_version": tag.cluster_set_version,
        "cluster_id": tag.cluster_id,
        "tag": tag.tag,
        "distance": tag.distance,
        "palette_tags": list(tag.palette_tags),
    }


# The cluster set version of a palette-only style assignment: palette tags of an image tagged before any cluster set
# existed. No export or record reads it as a style tag (they read the active set's rows only).
PALETTE_ONLY = ""


def palette_only_row(image_id: str, palette_tags: Sequence[str]) -> dict[str, Any]:
    return {
        "image_id": image_id,
        "cluster_set_version": PALETTE_ONLY,
        "cluster_id": -1,
        "tag": "",
        "distance": 0.0,
        "palette_tags": list(palette_tags),
    }


def save_style_tags(catalog: Catalog, tags: list[Any]) -> int:
    """Upserts StyleTag results as style assignments (keyed by image and cluster set version)."""
    rows = [style_tag_row(t) for t in tags]
    if rows:
        with catalog.session() as s:
            upsert(s, StyleAssignmentRow, rows, keys=("image_id", "cluster_set_version"))
    return len(rows)


# --- one batch of one stage ----------------------------------------------------------------------------------


@dataclass
class StageWork:
    """What a stage did for its claimed images: the rows to write (in the transaction that completes the stage)
    and the images that failed, each with its reason."""

    write: Callable[[Session], None] = lambda _s: None
    failed: dict[str, str] = field(default_factory=dict)


Work = Callable[[Settings, Catalog, list[Any]], StageWork]


_images_t = ImageRow.__table__


def _images(session: Session, image_ids: Sequence[str]) -> dict[str, Any]:
    """The columns the stages need of the batch's images (one SELECT)."""
    c = _images_t.c
    cols = (c.id, c.blob_key, c.tags, c.characters, c.artist, c.status, c.dup_group)
    return {r.id: r for r in session.execute(select(*cols).where(id_in(session, c.id, image_ids)))}


def _embeddings(session: Session, image_ids: Sequence[str], kind: str) -> dict[str, list[float]]:
    """Stored embeddings of `kind` of the batch (one SELECT)."""
    c = EmbeddingRow.__table__.c
    query = select(c.image_id, c.vector).where(id_in(session, c.image_id, image_ids), c.kind == kind)
    return {i: np.frombuffer(v, dtype="<f4").tolist() for i, v in session.execute(query)}


def _summary(stage: str, ids: Sequence[str], claimed: Sequence[str], failed: Sequence[str] = ()) -> dict:
    return {"stage": stage, "images": len(ids), "claimed": len(claimed), "failed": len(failed)}


def run_batch(task: Task, image_ids: Sequence[str], stage: str, work: Work) -> dict:
    """Claims the batch's (image, stage) rows not done yet (one statement), does `work` for them, then writes its
    rows, completes what succeeded and fails what did not (one transaction). Done rows are skipped."""
    settings = current_settings()
    ids = list(dict.fromkeys(image_ids))
    catalog: Catalog | None = None
    claimed: list[str] = []
    try:
        catalog = catalog_for(settings.database_url)
        with catalog.session() as s:
            claimed = claim_batch(s, ids, stage)
            images = _images(s, claimed) if claimed else {}
        if not claimed:
            log.info("batch already done", extra={"stage": stage, "images": len(ids)})
            return _summary(stage, ids, claimed)
        missing = {i: f"not_found: image {i} is not in the catalog" for i in claimed if i not in images}
        outcome = work(settings, catalog, [images[i] for i in claimed if i in images])
        failed = {**missing, **outcome.failed}
        with catalog.session() as s:
            outcome.write(s)
            complete_batch(s, [i for i in claimed if i not in failed], stage)
            fail_batch(s, failed, stage)
        if failed:
            log.warning("images failed a stage", extra={"stage": stage, "failed": len(failed), "images": len(ids)})
        return _summary(stage, ids, claimed, list(failed))
    except Exception as exc:
        return _after_error(task, exc, catalog, stage, ids, claimed)


def _after_error(
    task: Task, exc: Exception, catalog: Catalog | None, stage: str, ids: list[str], claimed: list[str]
) -> dict:
    """Parks the batch (retryable: a service UNAVAILABLE, the catalog unreachable) or fails its claimed images for
    good with the reason. Called from an `except` block: re-raises what is retried."""
    database_down = isinstance(exc, OperationalError)
    if catalog is None and not database_down:
        raise exc
    retries_left = task.max_retries is None or task.request.retries < task.max_retries
    if (is_retryable(exc) or database_down) and retries_left and not task.request.called_directly:
        if database_down:
            raise DependencyUnavailable(f"catalog database unavailable: {exc}") from exc
        note = f"retry {task.request.retries + 1}: {_reason(exc)}"
        assert catalog is not None
        with catalog.session() as s:
            wait_batch(s, claimed, stage, note)
        raise exc
    if catalog is None:
        raise exc
    reason = _reason(exc)
    failures = dict.fromkeys(claimed, reason)
    with catalog.session() as s:
        fail_batch(s, failures, stage)
        if stage == "persist" and claimed:
            s.execute(update(_images_t).where(id_in(s, _images_t.c.id, claimed)).values(status="failed", error=reason))
    log.warning("stage failed for a batch", extra={"stage": stage, "images": len(claimed), "error": reason})
    return _summary(stage, ids, claimed, claimed)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ItemFailed):
        return str(exc)
    code = getattr(exc, "code", None)
    if callable(code):
        try:
            return f"{code().name.lower()}: {exc.details()}"  # type: ignore[attr-defined]
        except Exception:
            pass
    return f"{type(exc).__name__}: {exc}"


# --- the stages ------------------------------------------------------------------------------------------------


def caption_batch(settings: Settings, _catalog: Catalog, images: list[Any]) -> StageWork:
    """Captions of every kind for the batch, guided by each image's tags, characters and artist: one call."""
    by_id = {r.id: r for r in images}

    def request(part: Sequence[str]) -> captioner_pb2.CaptionRequest:
        return captioner_pb2.CaptionRequest(
            items=[
                captioner_pb2.CaptionItem(
                    image=image_ref(settings, by_id[i]),
                    tags=by_id[i].tags or [],
                    characters=by_id[i].characters or [],
                    artists=[by_id[i].artist] if by_id[i].artist else [],
                    item_id=i,
                )
                for i in part
            ]
        )

    answers = ask_batch(CaptionerClient(settings).caption, request, list(by_id))
    rows: list[dict[str, Any]] = []
    for image_id, (result, _resp) in answers.results.items():
        mine = [
            {
                "image_id": image_id,
                "kind": caption_kind(c.kind),
                "text": c.text,
                "model": c.provenance.model,
                "model_version": c.provenance.model_version,
                "template_version": c.provenance.component_version,
            }
            for c in result.captions
            if caption_kind(c.kind)
        ]
        if mine:
            rows += mine
        else:
            answers.failed[image_id] = "no_captions: the captioner returned no captions"
    return StageWork(lambda s: bulk_upsert(s, CaptionRow, rows, keys=("image_id", "kind")), answers.failed)


def score_batch(settings: Settings, _catalog: Catalog, images: list[Any]) -> StageWork:
    """Aesthetic scores and the CLIP embeddings (stored once, for style and safety to reuse): one call."""
    refs = {r.id: image_ref(settings, r) for r in images}
    answers = ask_batch(
        ScorerClient(settings).score,
        lambda part: scorer_pb2.ScoreRequest(images=[refs[i] for i in part], include_embeddings=True),
        list(refs),
    )
    scores: list[dict[str, Any]] = []
    vectors: list[dict[str, Any]] = []
    for image_id, (r, _resp) in answers.results.items():
        scores.append(
            {
                "image_id": image_id,
                "raw": r.raw,
                "score": r.score,
                "score_tag": r.score_tag,
                "model": r.provenance.model,
                "model_version": r.provenance.model_version,
                "head_version": r.provenance.component_version,
            }
        )
        if r.embedding:
            vectors.append(embedding_row(image_id, CLIP_KIND, r.embedding, r.provenance))

    def write(s: Session) -> None:
        bulk_upsert(s, AestheticScoreRow, scores, keys=("image_id",))
        bulk_upsert(s, EmbeddingRow, vectors, keys=("image_id", "kind"))

    return StageWork(write, answers.failed)


def _passed(clip: dict[str, list[float]], part: Sequence[str]) -> list[common_pb2.Embedding]:
    """The stored CLIP embeddings of `part`, one per image in order, or none when any image has none (the service
    then runs its own tower on the pixels)."""
    if not all(i in clip for i in part):
        return []
    return [common_pb2.Embedding(values=clip[i]) for i in part]


def style_batch(settings: Settings, catalog: Catalog, images: list[Any]) -> StageWork:
    """Style cluster tag and palette tags from the active cluster set, the stored CLIP embeddings passed along (one
    Tag call); before any set exists, only the style embeddings (one Embed call; clustering then tags the pool:
    `services.curation.styles`)."""
    refs = {r.id: image_ref(settings, r) for r in images}
    ids = list(refs)
    with catalog.session() as s:
        active = s.scalar(select(StyleClusterSetRow.version).where(StyleClusterSetRow.active.is_(True)).limit(1))
        clip = _embeddings(s, ids, CLIP_KIND) if active is not None else {}
    client = StyleTaggerClient(settings)
    if active is not None:
        try:
            answers = ask_batch(
                client.tag,
                lambda part: style_tagger_pb2.TagRequest(
                    images=[refs[i] for i in part], include_embedding=True, embeddings=_passed(clip, part)
                ),
                ids,
            )
        except ItemFailed as exc:
            if exc.reason != "failed_precondition":
                raise
        else:
            tags, vectors = [], []
            for image_id, (tag, resp) in answers.results.items():
                tag.image_id = tag.image_id or image_id
                tags.append(style_tag_row(tag))
                if tag.embedding:
                    vectors.append(embedding_row(image_id, STYLE_KIND, tag.embedding, resp.provenance))

            def write_tags(s: Session) -> None:
                bulk_upsert(s, EmbeddingRow, vectors, keys=("image_id", "kind"))
                bulk_upsert(s, StyleAssignmentRow, tags, keys=("image_id", "cluster_set_version"))

            return StageWork(write_tags, answers.failed)
    # No cluster set yet (the first ingest): only the palette now (pixels, no image tower), kept on a palette-only
    # row; the first fit then tags the stored CLIP embeddings and carries these palettes over (styles.py).
    answers = ask_batch(
        client.palette,
        lambda part: style_tagger_pb2.PaletteRequest(
            images=[refs[i] for i in part], colors=settings.style_tagger.palette_colors
        ),
        ids,
    )
    rows = [palette_only_row(image_id, [c.tag for c in r.colors]) for image_id, (r, _resp) in answers.results.items()]
    return StageWork(
        lambda s: bulk_upsert(s, StyleAssignmentRow, rows, keys=("image_id", "cluster_set_version")), answers.failed
    )


def safety_batch(settings: Settings, catalog: Catalog, images: list[Any]) -> StageWork:
    """Rating and block decision from each image (its stored CLIP embedding when there is one), medium caption, tags
    and characters: one call."""
    by_id = {r.id: r for r in images}
    ids = list(by_id)
    with catalog.session() as s:
        c = CaptionRow.__table__.c
        medium = select(c.image_id, c.text).where(id_in(s, c.image_id, ids), c.kind == "medium")
        captions = {i: text for i, text in s.execute(medium)}
        clip = _embeddings(s, ids, CLIP_KIND)

    def item(i: str) -> safety_pb2.SafetyItem:
        row = by_id[i]
        extra = {"embedding": common_pb2.Embedding(values=clip[i])} if i in clip else {}
        return safety_pb2.SafetyItem(
            image=image_ref(settings, row),
            caption=captions.get(i) or "",
            tags=row.tags or [],
            characters=row.characters or [],
            item_id=i,
            **extra,
        )

    answers = ask_batch(
        SafetyClient(settings).check, lambda part: safety_pb2.CheckRequest(items=[item(i) for i in part]), ids
    )
    rows: list[dict[str, Any]] = []
    for image_id, (r, _resp) in answers.results.items():
        decision = enum_name(safety_pb2.Decision, r.decision, "DECISION_")
        if not decision:
            answers.failed[image_id] = "no_decision: the safety service returned no decision"
            continue
        rows.append(
            {
                "image_id": image_id,
                "rating": enum_name(common_pb2.Rating, r.rating, "RATING_") or "unknown",
                "decision": decision,
                "reasons": [{"rule_id": x.rule_id, "message": x.message} for x in r.reasons],
                "flags": list(r.flags),
                "unknown_characters": list(r.unknown_characters),
                "codex_version": int(r.codex_version) if r.codex_version.isdigit() else 0,
                "model": r.provenance.model,
                "model_version": r.provenance.model_version,
            }
        )
    return StageWork(lambda s: bulk_upsert(s, SafetyDecisionRow, rows, keys=("image_id",)), answers.failed)


def persist_batch(task: Task, image_ids: Sequence[str]) -> dict:
    """Joins the stages for every image of the batch whose four stages are final: `done`, or `failed` with every
    failed stage's reason, in one transaction (the persist claim, two image updates, the completion). Images still
    waiting for a stage are left for the persist the last stage sends. An image sent through the workflow again
    after a failure (persist done, image not final) is worked out again: the effect is a function of the ledger."""
    settings = current_settings()
    ids = list(dict.fromkeys(image_ids))
    catalog: Catalog | None = None
    claimed: list[str] = []
    try:
        catalog = catalog_for(settings.database_url)
        c = _images_t.c
        with catalog.session() as s:
            rows = ledger(s, ids, STAGES)
            images = {r.id: r for r in s.execute(select(c.id, c.status, c.dup_group).where(id_in(s, c.id, ids)))}
        ready = [
            i
            for i in ids
            if i in images and all(st in rows.get(i, {}) and rows[i][st].status in FINAL for st in WORK_STAGES)
        ]
        persisted = {i for i in ready if "persist" in rows[i] and rows[i]["persist"].status == "done"}
        rejoin = [i for i in ready if i in persisted and images[i].status not in FINAL]
        to_claim = [i for i in ready if i not in persisted]
        if not to_claim and not rejoin:
            return {**_summary("persist", ids, claimed), "waiting": len(ids) - len(ready)}
        failures = {
            i: "; ".join(f"{st}: {rows[i][st].error}" for st in WORK_STAGES if rows[i][st].status == "failed")
            for i in ready
        }
        with catalog.session() as s:
            claimed = claim_batch(s, to_claim, "persist")
            finish = claimed + rejoin
            done = [i for i in finish if not failures[i]]
            failed = {i: failures[i] for i in finish if failures[i]}
            if done:
                s.execute(update(_images_t).where(id_in(s, c.id, done)).values(status="done", error=None))
            if failed:
                s.execute(
                    update(_images_t)
                    .where(c.id == bindparam("b_id"))
                    .values(status="failed", error=bindparam("b_error")),
                    [{"b_id": i, "b_error": e} for i, e in failed.items()],
                )
            complete_batch(s, claimed, "persist")
        groups = sorted({images[i].dup_group for i in finish if images[i].dup_group})
        if groups:
            resolve_duplicates(catalog, groups=groups)
        return {**_summary("persist", ids, finish, list(failed)), "waiting": len(ids) - len(ready)}
    except Exception as exc:
        return _after_error(task, exc, catalog, "persist", ids, claimed)


# --- the tasks (no stored results: nothing reads them) ---------------------------------------------------------


@pony_task(TASK_NAMES["caption"], queue="caption", parks=True, ignore_result=True)
def caption(self: Task, image_ids: list[str]) -> dict:
    """Captions of every kind for a batch, guided by the images' tags and characters."""
    return run_batch(self, image_ids, "caption", caption_batch)


@pony_task(TASK_NAMES["score"], queue="score", parks=True, ignore_result=True)
def score(self: Task, image_ids: list[str]) -> dict:
    """Aesthetic scores, score tags and the CLIP embeddings of a batch."""
    return run_batch(self, image_ids, "score", score_batch)


@pony_task(TASK_NAMES["style"], queue="style", parks=True, ignore_result=True)
def style(self: Task, image_ids: list[str]) -> dict:
    """Style cluster tags and palette tags of a batch (only the palette before a cluster set exists)."""
    return run_batch(self, image_ids, "style", style_batch)


@pony_task(TASK_NAMES["safety"], queue="safety", parks=True, ignore_result=True)
def safety(self: Task, image_ids: list[str]) -> dict:
    """Ratings and block decisions of a batch from image embeddings, captions, tags and characters."""
    return run_batch(self, image_ids, "safety", safety_batch)


@pony_task(TASK_NAMES["persist"], queue="persist", parks=True, ignore_result=True)
def persist(self: Task, image_ids: list[str], *_parts: Any) -> dict:
    """Final status of the batch's images whose caption, score, style and safety have finished."""
    return persist_batch(self, image_ids)


def workflow(image_ids: Sequence[str] | str) -> Signature:
    """caption -> score -> (style -> persist, safety -> persist) for one batch: immutable signatures carrying the
    ids, chained by callbacks in the messages (no chord, so no result backend); whichever of style and safety
    finishes last sends the persist that joins the batch (the other finds it waiting, or finished)."""
    ids = [image_ids] if isinstance(image_ids, str) else list(image_ids)
    return chain(
        caption.si(ids),
        score.si(ids),
        group(chain(style.si(ids), persist.si(ids)), chain(safety.si(ids), persist.si(ids))),
    )
