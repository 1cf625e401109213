"""The judges of a generated image, all our own services: the style tagger's cluster for it (Tag) and its distance
to every cluster of the set (SimilarStyles), the scorer's aesthetic score and CLIP image embedding (Score), and the
CLIP text-image similarity of the image and its content prompt (the scorer's image embedding against the same
CLIP's text embedding, services/trainer/evaluation/clip_text.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from pony.v1 import common_pb2, scorer_pb2, style_tagger_pb2
from pony_common.config import Settings
from pony_common.errors import DependencyUnavailable, FailedPrecondition
from services.scorer.client import ScorerClient
from services.style_tagger.client import StyleTaggerClient
from services.trainer.evaluation.clip_text import ClipTextTower

BATCH = 32  # images per Tag / Score call
SIMILAR_K = 100  # the style tagger's most (MAX_SIMILAR_K): every cluster of a set up to that size


@dataclass(frozen=True)
class RawJudgement:
    """What the services said about one image, before the style request's cluster is resolved."""

    cell_id: str
    assigned_cluster: int
    assigned_distance: float
    distances: dict[int, float] = field(default_factory=dict)  # cluster id -> distance of the image's style
    content_similarity: float = 0.0
    aesthetic_score: float = 0.0

    def distance_to(self, cluster: int | None) -> float:
        if cluster is None:
            return float("nan")
        if cluster == self.assigned_cluster:
            return self.assigned_distance
        return self.distances.get(cluster, float("nan"))


def _rpc_error(service: str, exc: grpc.RpcError) -> Exception:
    code = exc.code()  # type: ignore[attr-defined]
    details = exc.details()  # type: ignore[attr-defined]
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPrecondition(f"{service}: {details}")
    return DependencyUnavailable(f"{service} {code.name}: {details}")


class Judges:
    """The three judges over their clients. `clusters()` lists the style tagger's current set."""

    def __init__(
        self,
        settings: Settings,
        style: StyleTaggerClient | None = None,
        scorer: ScorerClient | None = None,
        text: ClipTextTower | None = None,
    ) -> None:
        self.settings = settings
        self.style = style or StyleTaggerClient(settings)
        self.scorer = scorer or ScorerClient(settings)
        self.text = text or ClipTextTower(settings.model_path("scorer"))
        self._text_cache: dict[str, np.ndarray] = {}

    def clusters(self) -> list[tuple[int, str, str]]:
        """(cluster id, tag, family) of every discoverable cluster of the style tagger's active set."""
        try:
            first = self.style.similar_styles(style_tagger_pb2.SimilarStylesRequest(cluster_id=0, k=SIMILAR_K))
        except grpc.RpcError as exc:
            raise _rpc_error("style tagger", exc) from None
        found = {c.cluster_id: (c.tag, c.family) for c in first.clusters}
        if found:
            # Cluster 0 itself is excluded from its own answer: ask from another one whether 0 is listed.
            other = min(found)
            again = self.style.similar_styles(style_tagger_pb2.SimilarStylesRequest(cluster_id=other, k=SIMILAR_K))
            found.update({c.cluster_id: (c.tag, c.family) for c in again.clusters})
        return sorted((cid, tag, family) for cid, (tag, family) in found.items() if tag)

    def _text(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        missing = sorted({t for t in texts if t not in self._text_cache})
        if missing:
            for text, vec in zip(missing, self.text.embed(missing).numpy(), strict=True):
                self._text_cache[text] = vec
        return {t: self._text_cache[t] for t in texts}

    def judge(self, items: Sequence[tuple[str, bytes, str]]) -> list[RawJudgement]:
        """(cell id, PNG bytes, content prompt text) -> one RawJudgement each, in order."""
        out: list[RawJudgement] = []
        texts = self._text([t for _, _, t in items])
        for start in range(0, len(items), BATCH):
            chunk = items[start : start + BATCH]
            refs = [common_pb2.ImageRef(data=png) for _, png, _ in chunk]
            try:
                tagged = self.style.tag(style_tagger_pb2.TagRequest(images=refs, skip_palette=True)).results
                scored = self.scorer.score(scorer_pb2.ScoreRequest(images=refs, include_embeddings=True)).results
            except grpc.RpcError as exc:
                raise _rpc_error("style tagger / scorer", exc) from None
            for (cell_id, _png, text), tag, score, ref in zip(chunk, tagged, scored, refs, strict=True):
                for name, result in (("style tagger", tag), ("scorer", score)):
                    if result.HasField("error") and result.error.reason:
                        raise DependencyUnavailable(f"{name} could not judge {cell_id}: {result.error.message}")
                try:
                    similar = self.style.similar_styles(style_tagger_pb2.SimilarStylesRequest(image=ref, k=SIMILAR_K))
                except grpc.RpcError as exc:
                    raise _rpc_error("style tagger", exc) from None
                image_emb = np.asarray(score.embedding, dtype=np.float32)
                text_emb = texts[text]
                if image_emb.shape != text_emb.shape:
                    raise FailedPrecondition(
                        f"the scorer's CLIP ({image_emb.shape[0]}-d) is not the text tower's "
                        f"({text_emb.shape[0]}-d at {self.text.path}): set PONY_SCORER_MODEL to the scorer's model"
                    )
                out.append(
                    RawJudgement(
                        cell_id=cell_id,
                        assigned_cluster=int(tag.cluster_id),
                        assigned_distance=float(tag.distance),
                        distances={int(c.cluster_id): float(c.distance) for c in similar.clusters},
                        content_similarity=float(np.dot(image_emb, text_emb)),
                        aesthetic_score=float(score.score),
                    )
                )
        return out
