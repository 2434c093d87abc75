"""What importing the training package sets up for every verb's output."""

from __future__ import annotations

import subprocess
import sys


def test_hub_warnings_are_printed_once():
    # The CLI gives the root logger a handler (training.cli.main); huggingface_hub has its own.
    code = (
        "import logging, training; logging.basicConfig(format='%(message)s');"
        "from huggingface_hub.utils import logging as hub_logging;"
        "hub_logging.get_logger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stderr.count("Retrying in 1s") == 1, done.stderr
