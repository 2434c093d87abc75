"""How often a fresh process's first multi-threaded cos comes out inaccurate, with and without
training.mkl_vml's warm-up (pytorch/pytorch#188792).

    python bench/mkl_vml_race.py --processes 100

Each process runs a matrix product (so oneMKL is loaded), then the first cos of a rotary-style
[81, 64] float32 tensor on two threads, and compares it with float64. Run it after a torch
upgrade: where the bare count is 0 over a few hundred processes, the warm-up can go.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

CHILD = """
import sys, torch
if sys.argv[1] == "warm":
    from training import mkl_vml

    mkl_vml.warm_up()  # as training, merge, export and evaluation do when they start
torch.set_num_threads(2)
torch.randn(512, 128) @ torch.randn(128, 128)
positions = torch.arange(81, dtype=torch.float32)
inv_freq = 1.0 / 10000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)
angles = torch.outer(positions, inv_freq).repeat(1, 2)
print((angles.cos().double() - angles.double().cos()).abs().max().item())
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=100)
    args = parser.parse_args()
    for mode in ("bare", "warm"):
        errors = [
            float(
                subprocess.run(
                    [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True
                ).stdout
            )
            for _ in range(args.processes)
        ]
        bad = [e for e in errors if e > 1e-5]
        print(f"{mode}: {len(bad)} of {len(errors)} processes inaccurate (worst error {max(errors):.2e})")


if __name__ == "__main__":
    main()
