"""A registry whose plugin module fails to import stays unloaded: the next lookup imports it
again and reports the import's error, not an unknown name."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from stageflow.core.registry import Registry


@dataclass(frozen=True)
class Entry:
    name: str
    fn: Callable


def test_a_failed_plugin_import_is_retried_not_read_as_an_unknown_name(tmp_path, monkeypatch):
    (tmp_path / "flaky_holder.py").write_text("REG = None\n")
    plugin = tmp_path / "flaky_plugin.py"
    plugin.write_text(
        "from flaky_holder import REG\n"
        "REG.register('first')(print)\n"
        "raise ImportError('a dependency is missing')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import flaky_holder

    flaky_holder.REG = registry = Registry("thing", Entry, "flaky_plugin")
    with pytest.raises(ImportError, match="dependency is missing"):
        registry.names()
    with pytest.raises(ImportError, match="dependency is missing"):  # again, not "unknown thing"
        registry["first"]
    plugin.write_text(plugin.read_text().replace("raise ImportError", "# fixed:"))
    sys.modules.pop("flaky_plugin", None)
    assert registry.names() == ["first"]  # registered once, after the import succeeded
    for module in ("flaky_plugin", "flaky_holder"):
        sys.modules.pop(module, None)
