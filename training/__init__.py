"""QLoRA fine-tuning: recipes, data formats, 4-bit model loading, training, merging."""

import logging

__version__ = "0.1.0"

# bitsandbytes tries to fetch an optional CPU kernel from the Hub at import time and logs a
# warning on every run when it cannot (offline, or the `kernels` package absent); its
# built-in CPU path is used instead and is correct.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
