"""serving.mkl_vml warms up exactly the ops the installed torch sends to oneMKL's VML."""

from __future__ import annotations

import logging
import re
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from serving import mkl_vml
from serving.launcher import PLUGIN, has_plugin

VML_HEADER = Path(torch.__file__).parent / "include" / "ATen" / "cpu" / "vml.h"


@pytest.mark.skipif(not VML_HEADER.is_file(), reason="this torch ships no ATen headers")
def test_the_warm_up_covers_every_op_torch_routes_to_vml():
    # Lines commented out in the header (// IMPLEMENT_VML_MKL(abs, Abs)) are not routed.
    routed = set(re.findall(r"^IMPLEMENT_VML_MKL\((\w+),", VML_HEADER.read_text(), flags=re.M))
    assert routed, f"{VML_HEADER} no longer declares IMPLEMENT_VML_MKL: check pytorch/pytorch#188792"
    assert routed == set(mkl_vml.VML_FUNCTIONS)


def test_each_warmed_up_op_is_a_torch_function_that_agrees_with_float64_after_the_warm_up():
    mkl_vml.warm_up()
    x = torch.linspace(0.1, 0.9, 5000, dtype=torch.float32)  # above VML's 2048-element grain
    for name in mkl_vml.VML_FUNCTIONS:
        got = getattr(torch, name)(x).double()
        want = getattr(torch, name)(x.double())
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6), name


def test_vllm_finds_the_warm_up_as_a_general_plugin_and_logs_it_under_its_own_logger(caplog):
    """What vLLM's load_general_plugins does in each of its processes (vllm/plugins/__init__.py):
    entry points of the group vllm.general_plugins, loaded and called."""
    plugins = {e.name: e for e in entry_points(group="vllm.general_plugins")}
    assert PLUGIN in plugins, "pyproject.toml no longer registers the vLLM plugin"
    plugin = plugins[PLUGIN].load()
    assert plugin is mkl_vml.vllm_plugin
    with caplog.at_level(logging.INFO, logger="vllm"):
        plugin()
    assert [r.name for r in caplog.records] == ["vllm.qlora_stack"]
    assert "oneMKL vector math settled" in caplog.records[0].getMessage()


def test_the_launcher_tells_a_python_with_the_plugin_from_one_without(tmp_path, monkeypatch):
    """serve notes a vLLM environment that lacks the plugin (a VLLM_PYTHON of the user's, or a
    .venv-vllm from before the plugin existed) instead of serving with a possibly wrong rotary table."""
    monkeypatch.chdir(tmp_path)  # not the project root, whose egg-info any Python started there reads
    assert has_plugin(sys.executable)  # .venv: the project is installed in it
    assert not has_plugin(sys._base_executable)  # the interpreter .venv was made from
    assert not has_plugin(str(tmp_path / "no-python"))
