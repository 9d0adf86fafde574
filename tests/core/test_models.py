"""selma.core.models: the resolver registry keyed by spec prefix."""

import pytest

from selma.core.models import model_prefixes, register_model_prefix, resolve_model


def test_builtin_prefixes_are_registered_and_other_specs_pass_through():
    assert {"tiny:", "world:"} <= set(model_prefixes())
    for spec in ("/models/sd14", "CompVis/stable-diffusion-v1-4", "relative/path"):
        assert resolve_model(spec) == spec


def test_a_registered_prefix_resolves_through_its_function_only_when_asked(monkeypatch, tmp_path):
    import sys
    import types

    calls = []
    module = types.ModuleType("selma_test_resolvers")
    module.resolve = lambda spec: calls.append(spec) or str(tmp_path / spec.split(":", 1)[1])
    monkeypatch.setitem(sys.modules, "selma_test_resolvers", module)
    monkeypatch.setattr("selma.core.models._RESOLVERS", {"mine:": "selma_test_resolvers:resolve"})
    assert resolve_model("/elsewhere/mine:x") == "/elsewhere/mine:x" and calls == []
    assert resolve_model("mine:model-a") == str(tmp_path / "model-a") and calls == ["mine:model-a"]


def test_the_shipped_world_model_resolves_and_unknown_ones_are_named():
    from pathlib import Path

    assert (Path(resolve_model("world:base")) / "model_index.json").is_file()
    with pytest.raises(ValueError, match="world:nope"):
        resolve_model("world:nope")


@pytest.mark.parametrize("prefix, resolver", [("", "a:b"), ("x:", "no-colon"), ("x:", ":f"), ("x:", "m:")])
def test_a_malformed_registration_is_refused(prefix, resolver):
    with pytest.raises(ValueError, match="register_model_prefix"):
        register_model_prefix(prefix, resolver)
