"""Registry model URIs (`models:/name/N`, `models:/name@alias`), parsed in one place."""

from __future__ import annotations

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

PREFIX = "models:/"


def registered_name(model_uri: str) -> str | None:
    """`models:/name/3` or `models:/name@alias` → name; None for a URI outside the registry."""
    rest = model_uri.removeprefix(PREFIX)
    return rest.partition("@")[0].partition("/")[0] if rest != model_uri else None


def registered_version(model_uri: str, client: MlflowClient | None = None) -> ModelVersion:
    """The version `models:/name/N` or `models:/name@alias` names now (an alias may move later)."""
    client = client or MlflowClient()
    name, at, alias = model_uri.removeprefix(PREFIX).partition("@")
    if at:
        return client.get_model_version_by_alias(name, alias)
    name, _, number = name.rpartition("/")
    return client.get_model_version(name, number)
