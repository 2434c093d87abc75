"""`llamafactory-cli train CONFIG` with the bench's throughput callback (run in LLaMA-Factory's venv).

For one device the CLI's train command calls llamafactory.train.tuner.run_exp() with the
config's arguments in-process; run_exp(args, callbacks) is the same entry with extra
TrainerCallbacks, the only way to add one (the config cannot name callbacks).
"""

import json
import sys
from pathlib import Path

from llamafactory.train.tuner import run_exp
from throughput_callback import PeerThroughput

run_exp(json.loads(Path(sys.argv[1]).read_text(encoding="utf-8")), callbacks=[PeerThroughput()])
