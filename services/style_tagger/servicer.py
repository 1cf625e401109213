"""`pony.v1.StyleTagger` over gRPC, transport only: image refs and protos in, `StyleTaggerService` calls, protos out."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from grpc import aio

from pony.v1 import common_pb2, style_tagger_pb2, style_tagger_pb2_grpc
from pony_common.budgets import load_image_ref, load_images
from pony_common.config import Settings
from pony_common.errors import InvalidArgument
from pony_common.fields import check_image_ref
from pony_common.grpc.auth import Role
from pony_common.imagerefs import ImageResolver, LoadedImage
from pony_common.metrics import ITEM_FAILURES
from services.style_tagger.clusters import ClusterSet
from services.style_tagger.model import SERVICE
from services.style_tagger.service import FitParams, StyleTaggerService


def _item_error(exc: InvalidArgument) -> common_pb2.ItemError:
    ITEM_FAILURES.labels(SERVICE, "invalid_image").inc()
    return common_pb2.ItemError(reason="invalid_image", message=exc.message, field=exc.field)


class StyleTaggerServicer(style_tagger_pb2_grpc.StyleTaggerServicer):
    # The role each method needs (pony_common.grpc.auth: generate < worker < admin); every method has one.
    ROLES = {
        "Embed": Role.WORKER,
        "Tag": Role.WORKER,
        "Palette": Role.WORKER,
        "SimilarStyles": Role.GENERATE,
        "FitClusters": Role.ADMIN,
    }

    def __init__(self, settings: Settings, service: StyleTaggerService) -> None:
        self.settings = settings
        self.service = service
        self.resolver = ImageResolver(settings)

    def _resolve(
        self, refs: Sequence[common_pb2.ImageRef], field: str
    ) -> tuple[list[tuple[int, LoadedImage]], dict[int, common_pb2.ItemError]]:
        """The images read and sized under the request's budget (over it, the request is refused before any pixel
        is decoded), then decoded; a bad image is its index's ItemError."""
        loaded, errors = [], {}
        named = [(f"{field}[{i}]", ref) for i, ref in enumerate(refs)]
        for i, got in enumerate(load_images(self.resolver, named, self.service.budget, field)):
            if isinstance(got, InvalidArgument):
                errors[i] = _item_error(got)
            else:
                loaded.append((i, got))
        return loaded, errors

    @staticmethod
    def _unread(
        refs: Sequence[common_pb2.ImageRef],
    ) -> tuple[list[tuple[int, LoadedImage | None]], dict[int, common_pb2.ItemError]]:
        """Refs whose images are not read (their embeddings were given): only their text is checked."""
        loaded: list[tuple[int, LoadedImage | None]] = []
        errors = {}
        for i, ref in enumerate(refs):
            try:
                check_image_ref(ref, f"images[{i}]")
            except InvalidArgument as exc:
                errors[i] = _item_error(exc)
            else:
                loaded.append((i, None))
        return loaded, errors

    def _provenance(self, component: str = "") -> common_pb2.Provenance:
        return common_pb2.Provenance(
            model=self.service.model_id, model_version=self.service.model_version, component_version=component
        )

    async def Embed(
        self, request: style_tagger_pb2.StyleTaggerEmbedRequest, context: aio.ServicerContext
    ) -> style_tagger_pb2.StyleTaggerEmbedResponse:
        self.service.check_batch(len(request.images))
        loaded, errors = await asyncio.to_thread(self._resolve, request.images, "images")
        vectors = await self.service.embed_async([li.image for _, li in loaded])
        by_index = {i: (li, vec) for (i, li), vec in zip(loaded, vectors, strict=True)}
        results = []
        for i, ref in enumerate(request.images):
            if i in errors:
                results.append(style_tagger_pb2.StyleEmbedResult(image_id=ref.image_id, error=errors[i]))
            else:
                li, vec = by_index[i]
                results.append(style_tagger_pb2.StyleEmbedResult(image_id=li.image_id, embedding=vec.tolist()))
        return style_tagger_pb2.StyleTaggerEmbedResponse(
            results=results, provenance=self._provenance(), dim=self.service.dim
        )

    async def FitClusters(
        self, request: style_tagger_pb2.FitClustersRequest, context: aio.ServicerContext
    ) -> style_tagger_pb2.FitClustersResponse:
        params = FitParams(
            k=request.k,
            per_family=request.per_family,
            max_artist_share=request.max_artist_share,
            seed=request.seed,
            activate=request.activate,
            assign=request.assign,
        )
        cluster_set, assigned = await asyncio.to_thread(self.service.fit_and_assign, params)
        return fit_response(cluster_set, request.activate, assigned)

    async def Tag(
        self, request: style_tagger_pb2.TagRequest, context: aio.ServicerContext
    ) -> style_tagger_pb2.TagResponse:
        """With `embeddings` the encoder does not run; with `skip_palette` as well the images are not read at all
        (each result's image_id is then the one the request gave)."""
        refs = request.images
        self.service.check_batch(len(refs))
        given = (
            self.service.given_embeddings([e.values for e in request.embeddings], len(refs))
            if request.embeddings
            else None
        )
        version = (await asyncio.to_thread(self.service.active)).cluster_set.version
        loaded: list[tuple[int, LoadedImage | None]]
        if given is not None and request.skip_palette:
            loaded, errors = self._unread(refs)
        else:
            loaded, errors = await asyncio.to_thread(self._resolve, refs, "images")  # type: ignore[assignment]
        tagged = (
            await self.service.tag_async(
                [li.image if li else None for _, li in loaded],
                [li.image_id if li else refs[i].image_id for i, li in loaded],
                given[[i for i, _ in loaded]] if given is not None else None,
                with_palette=not request.skip_palette,
            )
            if loaded
            else []
        )
        by_index = {i: r for (i, _), r in zip(loaded, tagged, strict=True)}
        results = []
        for i, ref in enumerate(refs):
            if i in errors:
                results.append(style_tagger_pb2.StyleTag(image_id=ref.image_id, error=errors[i]))
                continue
            r = by_index[i]
            version = r.cluster_set_version
            results.append(
                style_tagger_pb2.StyleTag(
                    image_id=r.image_id,
                    cluster_id=r.cluster_id,
                    tag=r.tag,
                    distance=r.distance,
                    cluster_set_version=r.cluster_set_version,
                    palette_tags=r.palette_tags,
                    embedding=r.embedding.tolist() if request.include_embedding and r.embedding is not None else [],
                    flagged=r.flagged,
                    family=r.family,
                )
            )
        return style_tagger_pb2.TagResponse(results=results, provenance=self._provenance(version))

    async def SimilarStyles(
        self, request: style_tagger_pb2.SimilarStylesRequest, context: aio.ServicerContext
    ) -> style_tagger_pb2.SimilarStylesResponse:
        which = request.WhichOneof("query")
        vector = None
        if which == "image":
            self.service.model.require_ready()  # UNAVAILABLE before the image is fetched
            image = await asyncio.to_thread(load_image_ref, self.resolver, request.image, "image", self.service.budget)
            vector = (await self.service.embed_async([image.image]))[0]

        def work() -> style_tagger_pb2.SimilarStylesResponse:
            version, found = self.service.similar_styles(
                vector=vector,
                cluster_id=request.cluster_id if which == "cluster_id" else None,
                k=request.k,
                examples=request.examples,
            )
            return style_tagger_pb2.SimilarStylesResponse(
                clusters=[
                    style_tagger_pb2.SimilarCluster(
                        cluster_id=s.cluster.id,
                        tag=s.cluster.tag,
                        distance=s.distance,
                        example_image_ids=s.examples,
                        family=s.cluster.family,
                        size=s.cluster.size,
                    )
                    for s in found
                ],
                cluster_set_version=version,
            )

        return await asyncio.to_thread(work)

    async def Palette(
        self, request: style_tagger_pb2.PaletteRequest, context: aio.ServicerContext
    ) -> style_tagger_pb2.PaletteResponse:
        self.service.check_batch(len(request.images))

        def work() -> style_tagger_pb2.PaletteResponse:
            loaded, errors = self._resolve(request.images, "images")
            palettes = self.service.palette([li.image for _, li in loaded], request.colors) if loaded else []
            by_index = {i: (li, p) for (i, li), p in zip(loaded, palettes, strict=True)}
            results = []
            for i, ref in enumerate(request.images):
                if i in errors:
                    results.append(style_tagger_pb2.PaletteResult(image_id=ref.image_id, error=errors[i]))
                    continue
                li, colors = by_index[i]
                results.append(
                    style_tagger_pb2.PaletteResult(
                        image_id=li.image_id,
                        colors=[
                            style_tagger_pb2.PaletteColor(name=c.name, tag=c.tag, share=c.share, hex=c.hex)
                            for c in colors
                        ],
                    )
                )
            return style_tagger_pb2.PaletteResponse(results=results)

        return await asyncio.to_thread(work)


def fit_response(cluster_set: ClusterSet, activated: bool, assigned: int = 0) -> style_tagger_pb2.FitClustersResponse:
    return style_tagger_pb2.FitClustersResponse(
        cluster_set_version=cluster_set.version,
        clusters=len(cluster_set.clusters),
        embeddings=cluster_set.embeddings,
        reports=[
            style_tagger_pb2.ClusterReport(
                cluster_id=c.id,
                tag=c.tag,
                size=c.size,
                top_artist=c.top_artist,
                top_artist_share=c.top_artist_share,
                status=c.status,
                reason=c.reason,
                family=c.family,
            )
            for c in cluster_set.clusters
        ],
        activated=activated,
        assigned=assigned,
    )
