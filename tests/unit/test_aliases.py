"""The alias store against the real Redis: set/move/delete, the reverse index, outage fallback."""

from __future__ import annotations

import pytest

from core.jobs import redis_client
from models_store.aliases import (
    AliasStore,
    AliasStoreUnavailable,
    InvalidAlias,
    model_name,
    validate_alias,
)
from tests.conftest import RedisServer


@pytest.fixture
def aliases(stack) -> AliasStore:
    return AliasStore(redis_client(stack.env["REDIS_URL"], 2.0), stack.env["REDIS_PREFIX"])


def test_set_moves_the_alias_between_models_of_one_name(aliases, stack):
    assert aliases.set("mnist_lenet5", "production", "m1") is None
    assert aliases.get("mnist_lenet5", "production") == "m1"
    assert aliases.aliases_of("m1") == ["production"]
    assert aliases.set("mnist_lenet5", "production", "m2") == "m1"
    assert aliases.get("mnist_lenet5", "production") == "m2"
    assert aliases.aliases_of("m1") == [] and aliases.aliases_of("m2") == ["production"]
    # the same alias under another name is another alias
    aliases.set("cifar10_dense", "production", "d1")
    aliases.set("mnist_lenet5", "staging", "m2")
    assert aliases.aliases_of_many(["m1", "m2", "d1", "nope"]) == {
        "m1": [],
        "m2": ["production", "staging"],
        "d1": ["production"],
        "nope": [],
    }
    prefix = stack.env["REDIS_PREFIX"]
    raw = stack.redis()
    assert raw.get(f"{prefix}:alias:mnist_lenet5:production") == "m2"
    assert raw.hgetall(f"{prefix}:aliases:m2") == {"production": "mnist_lenet5", "staging": "mnist_lenet5"}
    assert aliases.all() == {
        ("mnist_lenet5", "production"): "m2",
        ("mnist_lenet5", "staging"): "m2",
        ("cifar10_dense", "production"): "d1",
    }


def test_delete_only_removes_an_alias_the_model_carries(aliases):
    aliases.set("mnist_lenet5", "production", "m1")
    assert aliases.delete("m2", "production") is None
    assert aliases.get("mnist_lenet5", "production") == "m1"
    assert aliases.delete("m1", "production") == "mnist_lenet5"
    assert aliases.get("mnist_lenet5", "production") is None
    assert aliases.aliases_of("m1") == []
    assert aliases.delete("m1", "production") is None


def test_remove_model_drops_all_its_aliases_and_no_others(aliases):
    aliases.set("mnist_lenet5", "production", "m1")
    aliases.set("mnist_lenet5", "canary", "m1")
    aliases.set("mnist_lenet5", "staging", "m2")
    assert aliases.remove_model("m1") == ["canary", "production"]
    assert aliases.get("mnist_lenet5", "production") is None
    assert aliases.get("mnist_lenet5", "staging") == "m2"
    assert aliases.aliases_of("m1") == []
    assert aliases.remove_model("m1") == []


@pytest.mark.parametrize("alias", ["", "Production", "1st", "a" * 65, "a:b", "a b", "x\n"])
def test_invalid_aliases_are_refused(aliases, alias):
    with pytest.raises(InvalidAlias):
        validate_alias(alias)
    with pytest.raises(InvalidAlias):
        aliases.set("mnist_lenet5", alias, "m1")


def test_valid_alias_names():
    for alias in ("production", "a", "canary-2", "v_1", "a" * 64):
        assert validate_alias(alias) == alias


def test_model_name_is_the_dataset_when_present_else_the_task():
    assert model_name({"task": "mnist_lenet5"}) == "mnist_lenet5"
    assert model_name({"task": "custom_resnet18", "dataset": "flowers-1a2b"}) == "flowers-1a2b"
    assert model_name({}) is None


def test_aliases_survive_a_new_store_and_persist_in_redis(stack):
    first = AliasStore(redis_client(stack.env["REDIS_URL"], 2.0), stack.env["REDIS_PREFIX"])
    first.set("mnist_lenet5", "production", "m1")
    second = AliasStore(redis_client(stack.env["REDIS_URL"], 2.0), stack.env["REDIS_PREFIX"])
    assert second.get("mnist_lenet5", "production") == "m1"  # another process sees it at once


def test_outage_answers_from_the_last_table_read(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    try:
        store = AliasStore(redis_client(server.url, 0.5), "t")
        store.set("mnist_lenet5", "production", "m1")
        assert store.refresh()
        store.set("mnist_lenet5", "staging", "m2")  # kept in the copy too
        never_read = AliasStore(redis_client(server.url, 0.5), "t")
        server.stop()
        assert store.get("mnist_lenet5", "production") == "m1"
        assert store.get("mnist_lenet5", "staging") == "m2"
        assert store.get("mnist_lenet5", "canary") is None
        assert store.aliases_of_many(["m1", "m3"]) == {"m1": ["production"], "m3": []}
        assert not never_read.refresh()
        with pytest.raises(AliasStoreUnavailable):
            never_read.get("mnist_lenet5", "production")
    finally:
        server.stop()
