"""The registry: discovery of adapters/, entry-point plugins, presets and axis overrides, packaging."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

import peftkit
from peftkit import registry
from peftkit.config import resolve_config
from peftkit.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_every_adapter_file_is_imported_by_discovery():
    peftkit.methods()
    files = sorted(p.stem for p in (REPO / "adapters").glob("*.py") if not p.stem.startswith("_"))
    assert files, "adapters/ holds no method file"
    for stem in files:
        assert f"peftkit.adapters.{stem}" in sys.modules, f"adapters/{stem}.py was not discovered"


def test_registered_methods_include_the_foundation():
    names = peftkit.methods()
    assert {"lora", "lora-plus"} <= set(names)
    assert names == sorted(names)
    for name in names:
        method = registry.get_method(name)
        for axis in registry.AXES:
            registry.get_component(axis, getattr(method, axis))  # every preset points at registered components
        assert method.description, f"method {name} has no description"


def test_entry_point_plugin_is_loaded(tmp_path, monkeypatch):
    plugin = tmp_path / "peftkit_test_plugin.py"
    plugin.write_text(textwrap.dedent(
        """
        from peftkit import registry
        registry.register_method("test-plugin-lora", architecture="lora", description="a plugin preset")
        """
    ))
    dist = tmp_path / "peftkit_test_plugin-0.0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: peftkit-test-plugin\nVersion: 0.0.1\n")
    (dist / "entry_points.txt").write_text("[peftkit.adapters]\ntest_plugin = peftkit_test_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.setattr(registry, "_discovered", False)
    try:
        assert "test-plugin-lora" in peftkit.methods()
    finally:
        registry._methods.pop("test-plugin-lora", None)


def test_broken_plugin_warns_and_does_not_break_discovery(tmp_path, monkeypatch):
    dist = tmp_path / "peftkit_broken_plugin-0.0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: peftkit-broken-plugin\nVersion: 0.0.1\n")
    (dist / "entry_points.txt").write_text("[peftkit.adapters]\nbroken = no_such_module_for_peftkit\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.setattr(registry, "_discovered", False)
    with pytest.warns(UserWarning, match="broken"):
        names = peftkit.methods()
    assert "lora" in names


def test_axis_override_and_option_routing():
    config = resolve_config("lora", optimizer="lora-plus", loraplus_lr_ratio=4.0, r=4)
    assert (config.architecture, config.init, config.optimizer,
            config.schedule) == ("lora", "default", "lora-plus", "none")
    assert config.options["optimizer"]["loraplus_lr_ratio"] == 4.0
    assert config.r == 4
    # The preset's default for an axis the user swapped out is dropped, not an error.
    config = resolve_config("lora-plus", optimizer="adamw")
    assert "loraplus_lr_ratio" not in config.options.get("optimizer", {})


def test_unknown_method_lists_registered_names():
    with pytest.raises(ConfigError) as err:
        resolve_config("lorra")
    message = str(err.value)
    assert "lorra" in message and "Did you mean 'lora'" in message and "lora-plus" in message


def test_unknown_option_suggests_the_closest():
    with pytest.raises(ConfigError, match="Did you mean 'dropout'"):
        resolve_config("lora", dropot=0.1)


def test_wheel_ships_adapters_as_a_subpackage(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(REPO)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = next(tmp_path.glob("peftkit-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in (REPO / "adapters").glob("*.py"):
        assert f"peftkit/adapters/{path.name}" in names
    assert not any(n.startswith("adapters/") for n in names)
    assert any(n.endswith("entry_points.txt") for n in names)


def _imported_peftkit_modules(path) -> set[str]:
    """Every peftkit module a file imports, top-level and function-local ``import`` / ``from`` statements alike."""
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ("peftkit." + node.module if node.level and node.module
                    else ("peftkit" if node.level else node.module or ""))
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return {name.removeprefix("peftkit.") for name in names if name.startswith("peftkit")}


def test_no_import_circle_between_registry_optim_and_schedule():
    """The registry knows neither the optimizer machinery nor the schedules, and they do not import the registry
    (the generic adamw / default / none components register in peftkit/components.py)."""
    from pathlib import Path

    package = Path(peftkit.__file__).parent
    imports = {name: _imported_peftkit_modules(package / f"{name}.py") for name in ("registry", "optim", "schedule")}
    assert not imports["registry"] & {"optim", "schedule"}, imports["registry"]
    assert "registry" not in imports["optim"] and "registry" not in imports["schedule"], imports
    assert "optim" not in imports["schedule"] and "schedule" not in imports["optim"], imports
    assert {"adamw", "default", "none"} <= {name for axis in ("optimizer", "init", "schedule")
                                            for name in registry.components(axis)}


def test_loading_an_adapter_whose_plugin_is_missing_names_the_plugin(tmp_path, monkeypatch):
    """An adapter saved with a plugin's component records the plugin's module in peftkit.json; read where the
    plugin is not loaded, the error names that module (not only "unknown optimizer"). Built-in methods record
    nothing."""
    import json

    from helpers import tiny_llama

    (tmp_path / "peftkit_saved_plugin.py").write_text(textwrap.dedent(
        """
        import torch
        from peftkit import registry

        @registry.optimizer("test-plugin-sgd", description="a plugin optimizer")
        def build(model, lr, config, **options):
            return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
        """
    ))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    importlib.import_module("peftkit_saved_plugin")
    try:
        model = peftkit.wrap(tiny_llama(), "lora", r=2, targets=["q_proj"], optimizer="test-plugin-sgd")
        peftkit.save(model, tmp_path / "adapter")
        sidecar = json.loads((tmp_path / "adapter" / "peftkit.json").read_text())
        assert sidecar["plugins"] == {"optimizer:test-plugin-sgd": "peftkit_saved_plugin"}
        peftkit.load(tiny_llama(), tmp_path / "adapter")  # with the plugin loaded it reads as usual
    finally:
        registry._components["optimizer"].pop("test-plugin-sgd", None)
        sys.modules.pop("peftkit_saved_plugin", None)
    # Inference needs no optimizer: the adapter loads; training it names the missing plugin.
    loaded = peftkit.load(tiny_llama(), tmp_path / "adapter", trainable=True)
    with pytest.raises(ConfigError, match=r"optimizer 'test-plugin-sgd' was registered by the Python module "
                                          r"'peftkit_saved_plugin'.*import peftkit_saved_plugin first"):
        peftkit.optimizer(loaded, lr=1e-3)
    builtin = peftkit.wrap(tiny_llama(), "lora-plus", r=2, targets=["q_proj"])
    peftkit.save(builtin, tmp_path / "builtin")
    assert "plugins" not in json.loads((tmp_path / "builtin" / "peftkit.json").read_text())
