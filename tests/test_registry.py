from importlib.metadata import EntryPoint

import pytest

from fairbench.errors import FairbenchError, UnknownNameError
from fairbench.registry import PluginWarning, Registry


def make_registry(**values):
    reg = Registry("method", "fairbench.test")
    reg._entry_points = {name: EntryPoint(name, value, "fairbench.test") for name, value in values.items()}
    return reg


def test_builtins_come_from_entry_points():
    from fairbench import registry

    assert "erm" in registry.methods.names()
    assert "synthetic" in registry.datasets.names()
    assert registry.methods.get("erm").__module__ == "fairbench.methods.erm"


def test_unknown_name_suggests_the_closest():
    reg = make_registry(nir="fairbench.methods.erm:ERM", erm="fairbench.methods.erm:ERM")
    with pytest.raises(UnknownNameError) as info:
        reg.get("nri")
    assert str(info.value) == "unknown method 'nri'; did you mean 'nir'? available: erm, nir"
    assert info.value.exit_code == 2


def test_plugins_import_lazily():
    reg = make_registry(broken="no_such_module_xyz:Thing", erm="fairbench.methods.erm:ERM")
    assert reg.names() == ["broken", "erm"]  # listing names imports nothing
    assert reg.get("erm").__name__ == "ERM"


def test_broken_plugin_warns_and_the_rest_still_work():
    reg = make_registry(broken="no_such_module_xyz:Thing", erm="fairbench.methods.erm:ERM")
    with pytest.warns(PluginWarning, match=r"plugin 'broken' \(entry point 'no_such_module_xyz:Thing'.*ModuleNotFound"):
        loaded = reg.load_all()
    assert list(loaded) == ["erm"]
    with pytest.raises(FairbenchError, match="failed to import"):
        reg.get("broken")


def test_register_adds_without_entry_point():
    reg = make_registry()
    reg.register("mine", int)
    assert reg.get("mine") is int
    assert reg.names() == ["mine"]
