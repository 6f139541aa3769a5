"""The model catalogue: what is offered, the default model, fallback chains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llm_svc.catalogue import DEFAULT_MODELS_FILE, Catalogue, CatalogueError

DATA: dict[str, Any] = {
    "default_order": ["big", "local"],
    "models": [
        {"id": "local", "provider": "local", "queue": "local", "max_tokens": 64},
        {
            "id": "big",
            "provider": "openai",
            "upstream": "gpt-big",
            "queue": "premium",
            "max_tokens": 1000,
            "fallback": ["small", "local"],
        },
        {"id": "small", "provider": "gemini", "max_tokens": 500},
    ],
}


def test_the_shipped_catalogue_offers_only_local_without_keys() -> None:
    catalogue = Catalogue.load(DEFAULT_MODELS_FILE, {"local"})
    assert list(catalogue.models) == ["local"]
    assert catalogue.default_model == "local"
    assert catalogue.unavailable["gpt-4o-mini"] == "openai"
    assert catalogue.get("") == catalogue.get("local")


def test_the_shipped_catalogue_prefers_a_configured_provider() -> None:
    catalogue = Catalogue.load(DEFAULT_MODELS_FILE, {"local", "openai"})
    assert catalogue.default_model == "gpt-4o-mini"
    assert "gemini-2.5-flash" not in catalogue.models
    # The echo model never stands in for a real one (its chain has no other OpenAI model).
    assert [m.id for m in catalogue.chain("gpt-4o-mini")] == ["gpt-4o-mini"]


def test_no_shipped_model_falls_back_to_the_echo_model() -> None:
    catalogue = Catalogue.load(DEFAULT_MODELS_FILE, {"local", "openai", "gemini", "anthropic"})
    real = [m for m in catalogue.models.values() if m.provider != "local"]
    assert real and all("local" not in [c.id for c in catalogue.chain(m.id)] for m in real)


def test_provider_without_key_is_not_offered() -> None:
    catalogue = Catalogue.from_dict(DATA, {"local"})
    assert list(catalogue.models) == ["local"]
    assert catalogue.get("big") is None
    assert catalogue.chain("big") == []
    assert catalogue.default_model == "local"


def test_entries_and_chain() -> None:
    catalogue = Catalogue.from_dict(DATA, {"local", "openai", "gemini"})
    big = catalogue.models["big"]
    assert (big.provider, big.upstream, big.queue, big.max_tokens) == (
        "openai",
        "gpt-big",
        "premium",
        1000,
    )
    assert catalogue.models["small"].upstream == "small"  # upstream defaults to the id
    assert catalogue.default_model == "big"
    assert [m.id for m in catalogue.chain("big")] == ["big", "small", "local"]
    # A fallback whose provider is not configured is skipped.
    partial = Catalogue.from_dict(DATA, {"local", "openai"})
    assert [m.id for m in partial.chain("big")] == ["big", "local"]


def test_default_override() -> None:
    catalogue = Catalogue.from_dict(DATA, {"local", "openai"}, default_override="local")
    assert catalogue.default_model == "local"
    with pytest.raises(CatalogueError, match="not offered"):
        Catalogue.from_dict(DATA, {"local"}, default_override="big")


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ([{"id": "a", "provider": "local", "max_tokens": 1}] * 2, "duplicate"),
        ([{"id": "a", "provider": "local", "max_tokens": 1, "fallback": ["b"]}], "fallback"),
        ([{"id": "a", "provider": "local"}], "bad model entry"),
        ([{"id": "a", "provider": "local", "max_tokens": 0}], "positive"),
        ([{"id": "a", "provider": "openai", "max_tokens": 1}], "no model is offered"),
    ],
)
def test_bad_catalogues_are_refused(models: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(CatalogueError, match=message):
        Catalogue.from_dict({"models": models}, {"local"})


def test_load_reads_toml(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text('[[models]]\nid = "tiny"\nprovider = "local"\nqueue = "q"\nmax_tokens = 8\n')
    catalogue = Catalogue.load(path, {"local"})
    assert catalogue.default_model == "tiny"
    assert catalogue.models["tiny"].queue == "q"
