"""The safety backend (no gRPC): classifier + tag rules + the current codex -> one verdict per item."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import numpy as np

from pony_common.catalog.db import Catalog, catalog_for
from pony_common.config import ConfigError, Settings
from pony_common.errors import FailedPrecondition, InvalidArgument
from pony_common.metrics import BATCH_SIZE, MODEL_INFO
from pony_common.models.clip import ClipImageTower
from pony_common.models.dtypes import torch_dtype
from services.safety.classifier import NsfwClassifier
from services.safety.codex import Codex, CodexStore
from services.safety.policy import Policy, SafetyInput, SafetyVerdict
from services.safety.tag_rules import TagRules, load_tag_rules

logger = logging.getLogger(__name__)

SERVICE = "safety"


def policy_from(settings: Settings) -> Policy:
    try:
        return Policy(
            settings.safety.explicit_threshold,
            settings.safety.questionable_threshold,
            settings.safety.ambiguous_explicit,
        )
    except ValueError as exc:
        raise ConfigError(f"safety settings: {exc}") from None


class SafetyChecker:
    """KServe-style model object: `load()` once, then `check(items)`.

    The CLIP tower is `ClipImageTower.shared`, so a scorer or style tagger in the same process shares it.
    The codex is re-read from the catalog whenever its version changes (an import shows up on the next call).
    """

    def __init__(self, settings: Settings, catalog: Catalog | None = None) -> None:
        self.settings = settings
        self.policy = policy_from(settings)
        self._catalog = catalog
        self._classifier: NsfwClassifier | None = None
        self._rules: TagRules | None = None
        self._codex: Codex | None = None
        self._lock = threading.Lock()

    def load(self) -> None:
        s = self.settings
        self._rules = load_tag_rules(s.safety.blocked_tags_path)
        tower = ClipImageTower.shared(s.model_path(SERVICE), s.device, torch_dtype(s.dtype))
        classifier = NsfwClassifier(tower, s.head_path(SERVICE))
        classifier.load()
        if self._catalog is None:
            self._catalog = catalog_for(s.database_url)
        self._classifier = classifier
        codex = self.codex()
        MODEL_INFO.labels(SERVICE).info({"model": self.model_id, "version": self.model_version})
        logger.info("safety loaded", extra={"codex_version": codex.version, "rules_version": self._rules.version})

    @property
    def ready(self) -> bool:
        return self._classifier is not None and self._classifier.ready

    @property
    def classifier(self) -> NsfwClassifier:
        if self._classifier is None:
            raise FailedPrecondition("the safety checker is not loaded")
        return self._classifier

    @property
    def rules(self) -> TagRules:
        if self._rules is None:
            raise FailedPrecondition("the safety checker is not loaded")
        return self._rules

    @property
    def model_id(self) -> str:
        return self.classifier.tower.model_id

    @property
    def model_version(self) -> str:
        return self.classifier.tower.version

    @property
    def component_version(self) -> str:
        """The head, tag-rule and codex versions the verdicts depend on."""
        codex = self._codex.version if self._codex else 0
        return f"head:{self.classifier.head_version} rules:{self.rules.version} codex:v{codex}"

    def codex(self) -> Codex:
        """The current codex (reloaded when the catalog has a newer version)."""
        if self._catalog is None:
            raise FailedPrecondition("the safety checker is not loaded")
        store = CodexStore(self._catalog)
        latest = store.latest_version()
        with self._lock:
            if self._codex is None or self._codex.version != latest:
                self._codex = store.load()
                logger.info("codex loaded", extra={"codex_version": self._codex.version})
            return self._codex

    def check(self, items: Sequence[SafetyInput]) -> list[SafetyVerdict]:
        """One verdict per item, in order. An item needs an image, a caption, tags or characters."""
        for i, item in enumerate(items):
            if item.empty:
                raise InvalidArgument(f"items[{i}]", "needs an image, a caption, tags or character names")
        BATCH_SIZE.labels(SERVICE, "check").observe(len(items))
        codex = self.codex()
        with_image = [i for i, item in enumerate(items) if item.image is not None]
        scores: dict[int, np.ndarray] = {}
        if with_image:
            probs = self.classifier.predict([items[i].image for i in with_image])
            scores = dict(zip(with_image, probs, strict=True))
        return [self.policy.decide(item, scores.get(i), codex, self.rules) for i, item in enumerate(items)]
