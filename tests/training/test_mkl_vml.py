"""training.mkl_vml warms up exactly the ops the installed torch sends to oneMKL's VML."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from training import mkl_vml

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
