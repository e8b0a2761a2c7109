"""Caption engines behind one interface (:mod:`lm_service.engines.base`); ``--engine`` picks one."""

from __future__ import annotations

from lm_service.engines.base import CaptionEngine
from lm_service.engines.limits import EngineLimits
from services.errors import ConfigError
from services.model.adapters import AdapterResolver
from services.model.loading import LoadedModel

ENGINES = ("batched", "reference")
DEFAULT_ENGINE = "batched"


def make_engine(
    kind: str,
    loaded: LoadedModel,
    adapters: AdapterResolver | None = None,
    max_batch: int | None = None,
    limits: EngineLimits | None = None,
) -> CaptionEngine:
    """The engine named ``kind`` over a loaded model (decoder and tokenizer included).

    ``max_batch`` bounds the reference engine's batches; ``limits`` configure the batched one."""
    if kind == "reference":
        from lm_service.engines.reference import DEFAULT_MAX_BATCH, ReferenceEngine

        return ReferenceEngine(loaded, max_batch=max_batch or DEFAULT_MAX_BATCH, adapters=adapters)
    if kind == "batched":
        from lm_service.engines.batched import BatchedEngine

        return BatchedEngine(loaded, limits, adapters=adapters)
    raise ConfigError(f"unknown caption engine {kind!r}; choose one of {', '.join(ENGINES)}")
