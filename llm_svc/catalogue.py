"""The model catalogue: model id → provider, upstream name, queue, max_tokens, limits,
fallbacks; and per provider, its limits.

Loaded from one TOML file (`models.toml` beside this module, or LLM_MODELS_FILE). Only
models whose provider is configured are offered; everything else behaves as unknown.
"""

from __future__ import annotations

import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llm_svc.pacing import Pacing

DEFAULT_MODELS_FILE = Path(__file__).with_name("models.toml")
LOCAL_MODEL = "local"


class CatalogueError(ValueError):
    """The catalogue file is malformed, or the default model is not offered."""


@dataclass(frozen=True)
class Limits:
    """Requests and tokens per minute; 0 is unlimited."""

    rpm: int = 0
    tpm: int = 0


@dataclass(frozen=True)
class ModelEntry:
    id: str
    provider: str
    upstream: str
    queue: str
    max_tokens: int
    fallback: tuple[str, ...] = ()
    limits: Limits = Limits()
    pacing: Pacing = field(default_factory=Pacing)


@dataclass(frozen=True)
class Catalogue:
    models: Mapping[str, ModelEntry]  # the offered models, in file order
    default_model: str
    unavailable: Mapping[str, str]  # model id → provider, declared but not configured
    provider_limits: Mapping[str, Limits] = field(default_factory=dict)

    def limits_for(self, model: ModelEntry) -> dict[str, Limits]:
        """The scopes a call of `model` counts against: its provider, and the upstream
        model on that provider (two ids may share one upstream model, and its limits)."""
        return {
            model.provider: self.provider_limits.get(model.provider, Limits()),
            f"{model.provider}:{model.upstream}": model.limits,
        }

    def get(self, model_id: str) -> ModelEntry | None:
        """The offered model `model_id` ("" is the default model), or None."""
        return self.models.get(model_id or self.default_model)

    def chain(self, model_id: str) -> list[ModelEntry]:
        """The model followed by its offered fallbacks, each once; [] if not offered."""
        first = self.get(model_id)
        if first is None:
            return []
        chain = [first]
        for fallback in first.fallback:
            entry = self.models.get(fallback)
            if entry is not None and entry not in chain:
                chain.append(entry)
        return chain

    def with_provider_limits(self, overrides: Mapping[str, Mapping[str, int]]) -> Catalogue:
        """This catalogue with some providers' limits replaced (LLM_PROVIDER_LIMITS)."""
        limits = dict(self.provider_limits)
        for name, raw in overrides.items():
            limits[name] = _limits(name, raw)
        return replace(self, provider_limits=limits)

    @classmethod
    def load(
        cls,
        path: Path,
        configured_providers: Collection[str],
        default_override: str = "",
    ) -> Catalogue:
        with path.open("rb") as file:
            data = tomllib.load(file)
        return cls.from_dict(data, configured_providers, default_override)

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        configured_providers: Collection[str],
        default_override: str = "",
    ) -> Catalogue:
        declared = [_entry(raw) for raw in data.get("models", [])]
        ids = [entry.id for entry in declared]
        if len(set(ids)) != len(ids):
            raise CatalogueError("duplicate model id in the catalogue")
        for entry in declared:
            unknown = set(entry.fallback) - set(ids)
            if unknown:
                raise CatalogueError(f"model {entry.id}: unknown fallback {sorted(unknown)}")
        offered = {e.id: e for e in declared if e.provider in configured_providers}
        unavailable = {e.id: e.provider for e in declared if e.id not in offered}
        if default_override:
            if default_override not in offered:
                raise CatalogueError(f"default model {default_override!r} is not offered")
            default = default_override
        else:
            order = [str(m) for m in data.get("default_order", [])]
            candidates = [m for m in [*order, *offered] if m in offered]
            if not candidates:
                raise CatalogueError("no model is offered: configure a provider")
            default = candidates[0]
        providers = data.get("providers", {})
        if not isinstance(providers, Mapping):
            raise CatalogueError("[providers] must be a table of provider names")
        limits = {str(name): _limits(name, raw) for name, raw in providers.items()}
        return cls(offered, default, unavailable, limits)


def _entry(raw: Mapping[str, Any]) -> ModelEntry:
    try:
        entry = ModelEntry(
            id=str(raw["id"]),
            provider=str(raw["provider"]),
            upstream=str(raw.get("upstream", raw["id"])),
            queue=str(raw.get("queue", "default")),
            max_tokens=int(raw["max_tokens"]),
            fallback=tuple(str(m) for m in raw.get("fallback", ())),
            limits=_limits(raw.get("id"), raw),
            pacing=_pacing(raw),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CatalogueError(f"bad model entry {dict(raw)!r}: {error}") from error
    if entry.max_tokens <= 0:
        raise CatalogueError(f"model {entry.id}: max_tokens must be positive")
    return entry


def _pacing(raw: Mapping[str, Any]) -> Pacing:
    """`first_token_s`, `idle_s`, `deadline_s` of a model (llm_svc/pacing.py), each
    optional."""
    default = Pacing()
    pacing = Pacing(
        first_token_s=float(raw.get("first_token_s", default.first_token_s)),
        idle_s=float(raw.get("idle_s", default.idle_s)),
        deadline_s=float(raw.get("deadline_s", default.deadline_s)),
    )
    if min(pacing.first_token_s, pacing.idle_s, pacing.deadline_s) <= 0:
        raise ValueError("first_token_s, idle_s and deadline_s must be positive")
    return pacing


def _limits(owner: object, raw: object) -> Limits:
    if not isinstance(raw, Mapping):
        raise CatalogueError(f"{owner}: limits must be a table")
    try:
        limits = Limits(rpm=int(raw.get("rpm", 0)), tpm=int(raw.get("tpm", 0)))
    except (TypeError, ValueError) as error:
        raise CatalogueError(f"{owner}: bad rpm or tpm: {error}") from error
    if limits.rpm < 0 or limits.tpm < 0:
        raise CatalogueError(f"{owner}: rpm and tpm must not be negative")
    return limits
