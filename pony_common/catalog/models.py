"""SQLAlchemy 2 models of the catalog. Every produced value records the model and version that produced it."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


TS = DateTime(timezone=True)
IMAGE_FK = "images.id"


class ImageRow(Base):
    """An image, keyed by the sha256 of its bytes; a re-ingest of the same bytes finds this row."""

    __tablename__ = "images"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    blob_key: Mapped[str] = mapped_column(String(255))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    format: Mapped[str | None] = mapped_column(String(16))
    source_uri: Mapped[str | None] = mapped_column(Text)
    source_site: Mapped[str | None] = mapped_column(String(64))
    artist: Mapped[str | None] = mapped_column(String(255), index=True)
    category: Mapped[str] = mapped_column(String(32), default="other", index=True)
    tags: Mapped[list[Any]] = mapped_column(JSON, default=list)
    characters: Mapped[list[Any]] = mapped_column(JSON, default=list)
    phash: Mapped[str | None] = mapped_column(String(32))
    dup_group: Mapped[str | None] = mapped_column(String(64), index=True)
    is_duplicate: Mapped[bool] = mapped_column(Boolean, default=False)
    # The pHash has been matched against the near-duplicate index (only unindexed ones are matched on the next run).
    phash_indexed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Copies kept by database triggers (migration 0006): aesthetic_scores.score, safety_decisions.decision == allow,
    # and "group, status or score changed since the near-duplicate group was resolved". Written by the triggers only.
    score: Mapped[float | None] = mapped_column(Float)
    safety_allowed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    dup_stale: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # ingested -> processing -> done | failed
    status: Mapped[str] = mapped_column(String(16), default="ingested", index=True)
    error: Mapped[str | None] = mapped_column(Text)
    ingested_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow, onupdate=utcnow)


class CaptionRow(Base):
    __tablename__ = "captions"
    __table_args__ = (UniqueConstraint("image_id", "kind", name="uq_captions_image_kind"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    image_id: Mapped[str] = mapped_column(ForeignKey(IMAGE_FK, ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    text: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(255))
    model_version: Mapped[str] = mapped_column(String(64))
    template_version: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)


class AestheticScoreRow(Base):
    __tablename__ = "aesthetic_scores"
    image_id: Mapped[str] = mapped_column(ForeignKey(IMAGE_FK, ondelete="CASCADE"), primary_key=True)
    raw: Mapped[float] = mapped_column(Float)
    score: Mapped[float] = mapped_column(Float, index=True)
    score_tag: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(String(255))
    model_version: Mapped[str] = mapped_column(String(64))
    head_version: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)


class EmbeddingRow(Base):
    """A stored embedding (float32 little-endian bytes); kind is `clip` (scorer) or `style`."""

    __tablename__ = "embeddings"
    image_id: Mapped[str] = mapped_column(ForeignKey(IMAGE_FK, ondelete="CASCADE"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    model: Mapped[str] = mapped_column(String(255))
    model_version: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)


class StyleClusterSetRow(Base):
    __tablename__ = "style_cluster_sets"
    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    k: Mapped[int] = mapped_column(Integer)
    per_family: Mapped[bool] = mapped_column(Boolean, default=False)
    dim: Mapped[int] = mapped_column(Integer)
    # float32 centroids, row-major (clusters x dim)
    centroids: Mapped[bytes] = mapped_column(LargeBinary)
    # per cluster: id, tag, family, size, top_artist, share, status, reason
    clusters: Mapped[list[Any]] = mapped_column(JSON, default=list)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    model: Mapped[str] = mapped_column(String(255), default="")
    model_version: Mapped[str] = mapped_column(String(64), default="")
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)


class StyleAssignmentRow(Base):
    __tablename__ = "style_assignments"
    image_id: Mapped[str] = mapped_column(ForeignKey(IMAGE_FK, ondelete="CASCADE"), primary_key=True)
    cluster_set_version: Mapped[str] = mapped_column(String(64), primary_key=True)
    cluster_id: Mapped[int] = mapped_column(Integer, index=True)
    tag: Mapped[str] = mapped_column(String(64))
    distance: Mapped[float] = mapped_column(Float)
    palette_tags: Mapped[list[Any]] = mapped_column(JSON, default=list)
    created_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)


class SafetyDecisionRow(Base):
    __tablename__ = "safety_decisions"
    image_id: Mapped[str] = mapped_column(ForeignKey(IMAGE_FK, ondelete="CASCADE"), primary_key=True)
    rating: Mapped[str] = mapped_column(String(16), index=True)
    decision: Mapped[str] = mapped_column(String(8), index=True)
    reasons: Mapped[list[Any]] = mapped_column(JSON, default=list)
    flags: Mapped[list[Any]] = mapped_column(JSON, default=list)
    unknown_characters: Mapped[list[Any]] = mapped_column(JSON, default=list)
    codex_version: Mapped[int] = mapped_column(Integer, default=0)
    model: Mapped[str] = mapped_column(String(255))
    model_version: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)


class ModelVersionRow(Base):
    """A published model version (e.g. `pony_v7` version 3) and where its weights are."""

    __tablename__ = "model_versions"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    uri: Mapped[str] = mapped_column(Text)
    source_run_id: Mapped[str] = mapped_column(String(64), default="")
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)


class AdapterRow(Base):
    """A LoRA adapter (diffusers `pytorch_lora_weights.safetensors`) for a base model family, which the sampler can
    apply per request: published by a training run (one row per run) or registered by RegisterAdapter."""

    __tablename__ = "adapters"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    family: Mapped[str] = mapped_column(String(32))  # pony_v7
    base_model_version: Mapped[int | None] = mapped_column(Integer)  # model_versions.version it was trained on
    base_model_uri: Mapped[str] = mapped_column(Text, default="")
    uri: Mapped[str] = mapped_column(Text)  # folder holding the weights file
    sha256: Mapped[str] = mapped_column(String(64))  # of the weights file
    rank: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(Float)
    run_id: Mapped[str | None] = mapped_column(String(64), unique=True)  # None: registered (RegisterAdapter)
    created_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)
    # sha256 of the tensor data after the safetensors header (A1111's `Lora hashes`); None until first computed
    tensor_sha256: Mapped[str | None] = mapped_column(String(64))
    removed_at: Mapped[dt.datetime | None] = mapped_column(TS)  # RemoveAdapter; the version number stays taken


class EvaluationRow(Base):
    """A style-adherence evaluation of a model version (+ adapters) (services/trainer/evaluation): its summary
    figures, and where the whole report (JSON, Parquet, HTML) is in the blob store."""

    __tablename__ = "evaluations"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(64), index=True)  # model_versions.name (family), e.g. pony_v7
    version: Mapped[int | None] = mapped_column(Integer)  # model_versions.version evaluated
    adapters: Mapped[list[Any]] = mapped_column(JSON, default=list)  # [{"name", "weight"}]
    images: Mapped[int] = mapped_column(Integer, default=0)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    follow_rate: Mapped[float] = mapped_column(Float, default=0.0)
    locking: Mapped[float] = mapped_column(Float, default=0.0)
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # results.VersionSummary.to_dict()
    json_uri: Mapped[str] = mapped_column(Text, default="")
    parquet_uri: Mapped[str] = mapped_column(Text, default="")
    html_uri: Mapped[str] = mapped_column(Text, default="")
    # "" (a plain evaluation) | "promoted" | "blocked" (the promotion gate's verdict), and why
    verdict: Mapped[str] = mapped_column(String(16), default="")
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)
