"""The style tagger's logic, no gRPC: checks requests against their budgets, fits cluster sets from the catalog's
style embeddings, tags images with the active set, finds similar styles and names palettes.

`StyleTaggerService(settings)`, `service.model.load()`, then `service.tag(images, image_ids)`. The gRPC servicer
calls the `*_async` methods: their encoder forwards go through one dynamic batcher shared by concurrent calls, and
`tag_async` takes CLIP embeddings computed elsewhere (the scorer's) instead of running the encoder again."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from pony_common.batching import DynamicBatcher
from pony_common.budgets import RequestBudget
from pony_common.config import Settings
from pony_common.embeddings import check_embeddings, unit_rows
from pony_common.errors import FailedPrecondition, InvalidArgument
from pony_common.metrics import BATCH_SIZE
from pony_common.models.clip import ClipImageTower
from services.style_tagger.clusters import STORED_EXAMPLES, ClusterSet, EmbeddingTable, StyleCluster, fit_cluster_set
from services.style_tagger.index import StyleIndex, create_index
from services.style_tagger.model import SERVICE, StyleTaggerModel
from services.style_tagger.palette import MAX_COLORS, PaletteColor, palette
from services.style_tagger.store import StyleAssignment, StyleStore

logger = logging.getLogger(__name__)

DEFAULT_SIMILAR_K = 5
MAX_SIMILAR_K = 100


@dataclass(frozen=True)
class FitParams:
    """FitClusters' knobs; 0 means the configured value."""

    k: int = 0
    per_family: bool = False
    max_artist_share: float = 0.0
    seed: int = 0
    activate: bool = True
    assign: bool = False  # also tag every stored embedding the set was fitted on (bulk style_assignments)


@dataclass
class TagResult:
    image_id: str
    cluster_id: int
    tag: str  # empty when the nearest cluster is flagged by the artist guard
    distance: float
    cluster_set_version: str
    family: str
    flagged: bool
    palette_tags: list[str] = field(default_factory=list)
    embedding: np.ndarray | None = None

    def assignment(self) -> StyleAssignment:
        """This result as a `style_assignments` row (see `StyleStore.save_assignments`)."""
        return StyleAssignment(
            self.image_id, self.cluster_set_version, self.cluster_id, self.tag, self.distance, tuple(self.palette_tags)
        )


@dataclass(frozen=True)
class SimilarStyle:
    cluster: StyleCluster
    distance: float
    examples: list[str]


@dataclass
class ActiveSet:
    cluster_set: ClusterSet
    nearest: StyleIndex  # every cluster (Tag)
    discoverable: StyleIndex  # clusters with a tag (SimilarStyles)


class StyleTaggerService:
    """`embed`, `fit_clusters`, `tag`, `similar_styles`, `palette` over a `StyleTaggerModel` (loaded by the
    bootstrap, or by `model.load()`); every call is UNAVAILABLE while the model loads."""

    def __init__(self, settings: Settings, model: StyleTaggerModel | None = None) -> None:
        self.settings = settings
        self.model = model or StyleTaggerModel(settings)
        limit = settings.style_tagger.max_batch
        self.budget = RequestBudget.from_settings(settings, limit, "PONY_STYLE_MAX_BATCH")
        self._lock = threading.Lock()
        self._active: ActiveSet | None = None
        config = settings.style_tagger
        self.batcher: DynamicBatcher[Image.Image, np.ndarray] = DynamicBatcher(
            self._embed_batch,
            max_batch=max(1, config.batch_size),
            max_delay_s=max(0.0, config.batch_delay_ms) / 1000,
            name=SERVICE,
        )

    def close(self) -> None:
        self.batcher.close()
        self.model.teardown()

    @property
    def store(self) -> StyleStore:
        return StyleStore(self.model.catalog)

    @property
    def model_id(self) -> str:
        return self.model.model_id

    @property
    def model_version(self) -> str:
        return self.model.version

    @property
    def dim(self) -> int:
        return self.model.dim

    def check_batch(self, count: int, field: str = "images") -> None:
        """UNAVAILABLE while loading; INVALID_ARGUMENT naming `field` for no images or more than the batch budget.
        The images are then held to `budget` (bytes, pixels) before any is decoded (pony_common.budgets)."""
        self.model.require_ready()
        if not count:
            raise InvalidArgument(field, "at least one image is required")
        self.budget.check_items(count, field)

    # --- embeddings ---
    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(n, dim) float32 L2-normalised style embeddings."""
        self.model.require_ready()
        BATCH_SIZE.labels(SERVICE, "embed").observe(len(images))
        return self.model.embed(images)

    def _embed_batch(self, images: list[Image.Image]) -> list[np.ndarray]:
        """The batcher's model step: one encoder forward over images merged from concurrent calls."""
        return list(self.model.embed(images))

    async def embed_async(self, images: Sequence[Image.Image]) -> np.ndarray:
        """`embed` through the dynamic batcher; a failed model batch raises its error."""
        self.model.require_ready()
        BATCH_SIZE.labels(SERVICE, "embed").observe(len(images))
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        rows = await self.batcher.submit(list(images))
        for row in rows:
            if isinstance(row, BaseException):
                raise row
        return np.stack(rows)  # type: ignore[arg-type]

    def given_embeddings(self, vectors: Sequence[Sequence[float]], count: int, field: str = "embeddings") -> np.ndarray:
        """Embeddings a caller computed with the same CLIP tower (one per image, in order), unit rows; refused
        (INVALID_ARGUMENT naming `field` or `field[i]`) when this encoder is not a CLIP tower, when there are not
        `count`, or for a wrong width."""
        self.model.require_ready()
        if not isinstance(self.model.encoder, ClipImageTower):
            message = f"this style tagger's encoder {self.model_id} is not a CLIP tower: send images without them"
            raise InvalidArgument(field, message)
        if len(vectors) != count:
            raise InvalidArgument(field, f"{len(vectors)} embeddings for {count} images: give one per image, in order")
        return unit_rows(check_embeddings(vectors, self.dim, field))

    # --- clusters ---
    def _embedding_table(self) -> EmbeddingTable:
        """The stored embeddings of this encoder version: kind `style`, and with the CLIP tower as encoder also the
        scorer's kind `clip` rows (the same vectors: one CLIP pass serves both)."""
        kinds = ("style", "clip") if isinstance(self.model.encoder, ClipImageTower) else ("style",)
        return self.store.load_embeddings(model_version=self.model_version, dim=self.dim, kinds=kinds)

    def fit_clusters(self, params: FitParams = FitParams()) -> ClusterSet:
        """Clusters the catalog's style embeddings of this encoder version and stores the new cluster set (with
        `params.assign`, also tags every embedding it was fitted on: see `fit_and_assign`)."""
        return self.fit_and_assign(params)[0]

    def fit_and_assign(self, params: FitParams = FitParams()) -> tuple[ClusterSet, int]:
        """`fit_clusters`, and with `params.assign` the style assignment of every stored embedding under the new set
        written in bulk, without the image encoder (the images' earlier palette tags are kept). Returns the set and
        the number of assignments written."""
        self.model.require_ready()
        s = self.settings
        if params.k < 0:
            raise InvalidArgument("k", f"must be >= 0 (0 = the configured {s.style_tagger.k}), got {params.k}")
        if not 0.0 <= params.max_artist_share <= 1.0:
            raise InvalidArgument(
                "max_artist_share", f"must be in (0, 1] (0 = configured), got {params.max_artist_share}"
            )
        if params.seed < 0:
            raise InvalidArgument("seed", f"must be >= 0, got {params.seed}")
        table = self._embedding_table()
        if len(table) < 2:
            raise FailedPrecondition(
                f"need at least 2 style embeddings of encoder version {self.model_version} in the catalog, "
                f"found {len(table)}"
            )
        cluster_set = fit_cluster_set(
            table,
            k=params.k or s.style_tagger.k,
            per_family=params.per_family,
            max_artist_share=params.max_artist_share or s.style_tagger.max_artist_share,
            seed=params.seed,
            tag_format=s.style_tag_format,
            max_points=s.style_tagger.fit_max_points,
            model=self.model_id,
            model_version=self.model_version,
        )
        self.store.save_cluster_set(cluster_set, activate=params.activate)
        flagged = sum(c.flagged for c in cluster_set.clusters)
        logger.info(
            "fitted style clusters",
            extra={
                "version": cluster_set.version,
                "clusters": len(cluster_set.clusters),
                "flagged": flagged,
                "embeddings": len(table),
                "activated": params.activate,
            },
        )
        assigned = self.assign_stored(cluster_set, table) if params.assign else 0
        return cluster_set, assigned

    def assign_stored(self, cluster_set: ClusterSet, table: EmbeddingTable | None = None, chunk: int = 8192) -> int:
        """Writes the style assignment under `cluster_set` of every stored embedding of this encoder version (or of
        `table`) in bulk, `chunk` rows per write, keeping each image's latest palette tags. Idempotent (upserts).
        Returns the count."""
        self.model.require_ready()
        if table is None:
            table = self._embedding_table()
        index = create_index(self.settings.style_tagger.index, cluster_set.centroids)
        written = 0
        for start in range(0, len(table), chunk):
            ids = table.image_ids[start : start + chunk]
            distances, rows = index.search(np.ascontiguousarray(table.vectors[start : start + chunk]), 1)
            palettes = self.store.latest_palette_tags(ids)
            assignments = []
            for image_id, dist, row in zip(ids, distances[:, 0], rows[:, 0], strict=True):
                cluster = cluster_set.clusters[int(row)]
                assignments.append(
                    StyleAssignment(
                        image_id, cluster_set.version, cluster.id, cluster.tag, float(dist), palettes.get(image_id, ())
                    )
                )
            written += self.store.save_assignments(assignments)
        logger.info("assigned stored embeddings", extra={"version": cluster_set.version, "assigned": written})
        return written

    def active(self) -> ActiveSet:
        """The active cluster set and its indexes (rebuilt when another fit activates a new set)."""
        version = self.store.active_version()
        if version is None:
            raise FailedPrecondition("no active style cluster set: run FitClusters with activate first")
        with self._lock:
            if self._active is not None and self._active.cluster_set.version == version:
                return self._active
            cluster_set = self.store.load_cluster_set(version)
            if cluster_set is None:
                raise FailedPrecondition(f"active style cluster set {version} vanished")
            tagged = np.array([c.id for c in cluster_set.clusters if not c.flagged], dtype=np.int64)
            self._active = ActiveSet(
                cluster_set,
                create_index(self.settings.style_tagger.index, cluster_set.centroids),
                create_index(self.settings.style_tagger.index, cluster_set.centroids[tagged], tagged),
            )
            return self._active

    def _usable(self) -> ActiveSet:
        active = self.active()
        cs = active.cluster_set
        if cs.dim != self.dim or (cs.model_version and cs.model_version != self.model_version):
            raise FailedPrecondition(
                f"active style cluster set {cs.version} was fitted on {cs.model} version {cs.model_version} "
                f"(dim {cs.dim}); the encoder is version {self.model_version} (dim {self.dim}): refit"
            )
        return active

    # --- tagging ---
    def tag_vectors(self, vectors: np.ndarray, image_ids: Sequence[str]) -> list[TagResult]:
        """Nearest cluster of the active set for each embedding (no palette)."""
        self.model.require_ready()
        active = self._usable()
        cs = active.cluster_set
        distances, rows = active.nearest.search(vectors, 1)
        results = []
        for image_id, vec, dist, row in zip(image_ids, vectors, distances[:, 0], rows[:, 0], strict=True):
            cluster = cs.clusters[int(row)]
            results.append(
                TagResult(
                    image_id=image_id,
                    cluster_id=cluster.id,
                    tag=cluster.tag,
                    distance=float(dist),
                    cluster_set_version=cs.version,
                    family=cluster.family,
                    flagged=cluster.flagged,
                    embedding=np.asarray(vec, dtype=np.float32),
                )
            )
        return results

    def _with_palettes(self, results: list[TagResult], images: Sequence[Image.Image | None]) -> list[TagResult]:
        colors = self.settings.style_tagger.palette_colors
        for result, image in zip(results, images, strict=True):
            if image is not None:
                result.palette_tags = [c.tag for c in palette(image, colors)]
        return results

    def tag(self, images: Sequence[Image.Image], image_ids: Sequence[str]) -> list[TagResult]:
        """Style cluster (tag, distance, set version) and palette tags per image."""
        self.model.require_ready()
        if len(images) != len(image_ids):
            raise ValueError("images and image_ids differ in length")
        self._usable()  # fail before the encoder runs
        return self._with_palettes(self.tag_vectors(self.embed(images), image_ids), images)

    async def tag_async(
        self,
        images: Sequence[Image.Image | None],
        image_ids: Sequence[str],
        vectors: np.ndarray | None = None,
        with_palette: bool = True,
    ) -> list[TagResult]:
        """`tag` with the encoder forward merged with concurrent calls', or none at all when `vectors` (checked by
        `given_embeddings`) are given: the images are then only needed for the palette (None = no palette)."""
        self.model.require_ready()
        if len(images) != len(image_ids):
            raise ValueError("images and image_ids differ in length")
        await asyncio.to_thread(self._usable)  # fail before the encoder runs
        if vectors is None:
            vectors = await self.embed_async([image for image in images if image is not None])
        results = await asyncio.to_thread(self.tag_vectors, vectors, image_ids)
        if not with_palette:
            return results
        return await asyncio.to_thread(self._with_palettes, results, images)

    # --- discovery ---
    def similar_styles(
        self,
        *,
        image: Image.Image | None = None,
        vector: np.ndarray | None = None,
        cluster_id: int | None = None,
        k: int = 0,
        examples: int = 0,
    ) -> tuple[str, list[SimilarStyle]]:
        """The k nearest tagged clusters to an image, an embedding or a cluster (itself excluded), with example
        ids, and the version of the set they come from."""
        self.model.require_ready()
        given = sum(q is not None for q in (image, vector, cluster_id))
        if given == 0:
            raise InvalidArgument("query", "give an image or a cluster_id")
        if given > 1:
            raise InvalidArgument("query", "give exactly one of image or cluster_id")
        if not 0 <= k <= MAX_SIMILAR_K:
            raise InvalidArgument("k", f"must be in 0..{MAX_SIMILAR_K} (0 = {DEFAULT_SIMILAR_K}), got {k}")
        if not 0 <= examples <= STORED_EXAMPLES:
            raise InvalidArgument("examples", f"must be in 0..{STORED_EXAMPLES}, got {examples}")
        if image is not None:
            vector = self.embed([image])[0]
        k = k or DEFAULT_SIMILAR_K
        examples = examples or self.settings.style_tagger.examples
        active = self._usable()
        cs = active.cluster_set
        exclude = -1
        if cluster_id is not None:
            if cs.cluster(cluster_id) is None:
                raise InvalidArgument(
                    "cluster_id", f"no cluster {cluster_id} in set {cs.version} (0..{len(cs.clusters) - 1})"
                )
            vector = cs.centroids[cluster_id]
            exclude = cluster_id
        assert vector is not None
        distances, rows = active.discoverable.search(np.asarray(vector, dtype=np.float32)[None], k + 1)
        found = []
        for dist, row in zip(distances[0], rows[0], strict=True):
            if row < 0 or row == exclude or len(found) == k:
                continue
            cluster = cs.clusters[int(row)]
            found.append(SimilarStyle(cluster, float(dist), cluster.examples[:examples]))
        return cs.version, found

    # --- palette ---
    def palette(self, images: Sequence[Image.Image], colors: int = 0) -> list[list[PaletteColor]]:
        """Named dominant colours per image (0 = 3 colours)."""
        self.model.require_ready()
        if not 0 <= colors <= MAX_COLORS:
            raise InvalidArgument("colors", f"must be in 0..{MAX_COLORS} (0 = 3), got {colors}")
        BATCH_SIZE.labels(SERVICE, "palette").observe(len(images))
        return [palette(image, colors or 3) for image in images]
