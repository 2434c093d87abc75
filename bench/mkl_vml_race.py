"""How often a fresh process's first multi-threaded cos comes out inaccurate, with and without
serving.mkl_vml's warm-up (pytorch/pytorch#188792).

    python bench/mkl_vml_race.py --processes 100
    python bench/mkl_vml_race.py --engine vllm --processes 40   # with .venv-vllm (make vllm-venv)

--engine torch: each process runs a matrix product (so oneMKL is loaded), then the first cos of a
rotary-style [81, 64] float32 tensor on two threads, and compares it with float64; "warm" calls
the warm-up first, as training, merge, export and evaluation do when they start.
--engine vllm: each process (vLLM's own Python) builds vLLM's rotary embedding, whose cos/sin table
vLLM's CPU engine computes once per server, on two threads; "warm" first loads vLLM's general
plugins the way each vLLM process does, which runs the warm-up pyproject.toml registers; "bare"
runs with VLLM_PLUGINS="" (no general plugins), as vLLM did before it.
Run it after a torch or vLLM upgrade: where the bare count is 0 over a few hundred processes, the
warm-up can go.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from serving.launcher import vllm_python

TORCH_CHILD = """
import sys, torch
if sys.argv[1] == "warm":
    from serving import mkl_vml

    mkl_vml.warm_up()
torch.set_num_threads(2)
torch.randn(512, 128) @ torch.randn(128, 128)
positions = torch.arange(81, dtype=torch.float32)
inv_freq = 1.0 / 10000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)
angles = torch.outer(positions, inv_freq).repeat(1, 2)
print((angles.cos().double() - angles.double().cos()).abs().max().item())
"""

# vLLM 0.32: RotaryEmbedding._compute_cos_sin_cache (model_executor/layers/rotary_embedding/base.py)
# concatenates cos and sin of float32 angles; the reference takes the same angles to float64 first.
VLLM_CHILD = """
import sys, torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.plugins import load_general_plugins
if sys.argv[1] == "warm":
    load_general_plugins()
torch.set_num_threads(2)
torch.randn(512, 128) @ torch.randn(128, 128)
with set_current_vllm_config(VllmConfig()):
    rope = get_rope(64, 2048, is_neox_style=True, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)
angles = torch.outer(torch.arange(2048, dtype=torch.float32), inv_freq).double()
exact = torch.cat((angles.cos(), angles.sin()), dim=-1)
# The plugin ran in the warm processes only (vLLM logs, not raises, a plugin that fails to load).
assert ("serving.mkl_vml" in sys.modules) == (sys.argv[1] == "warm"), "the warm-up plugin did not run as intended"
print((rope.cos_sin_cache.double() - exact).abs().max().item())
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=100)
    parser.add_argument("--engine", choices=("torch", "vllm"), default="torch")
    args = parser.parse_args()
    if args.engine == "vllm":
        python = vllm_python()  # the one `serve` starts vLLM with: $VLLM_PYTHON, or .venv-vllm's
        if python is None:
            parser.error("--engine vllm needs vLLM's CPU build: make vllm-venv (or set VLLM_PYTHON)")
        child = VLLM_CHILD
    else:
        python, child = sys.executable, TORCH_CHILD
    # Interleaved, so that both modes see the same machine.
    errors: dict[str, list[float]] = {"bare": [], "warm": []}
    for _ in range(args.processes):
        for mode, found in errors.items():
            env = {**os.environ, **({"VLLM_PLUGINS": ""} if mode == "bare" else {})}
            done = subprocess.run(
                [python, "-c", child, mode], capture_output=True, text=True, check=True, env=env
            )
            found.append(float(done.stdout.split()[-1]))
    for mode, found in errors.items():
        bad = [e for e in found if e > 1e-5]
        print(f"{mode}: {len(bad)} of {len(found)} processes inaccurate (worst error {max(found):.2e})")


if __name__ == "__main__":
    main()
