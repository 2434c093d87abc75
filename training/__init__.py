"""QLoRA fine-tuning: recipes, data formats, 4-bit model loading, training, merging."""

import logging
import warnings

__version__ = "0.1.0"

# bitsandbytes tries to fetch an optional CPU kernel from the Hub at import time and logs a
# warning on every run when it cannot (offline, or the `kernels` package absent); its
# built-in CPU path is used instead and is correct.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# peft 0.21.2 reads model.is_gradient_checkpointing in PeftModel.__init__ (peft_model.py), a
# property transformers 5.23 deprecated in favour of is_activation_checkpointing; every train,
# merge and eval would print the FutureWarning. Exactly that warning is silenced until peft
# reads the new name; the stack itself uses only the new one.
warnings.filterwarnings(
    "ignore",
    message=r"`is_gradient_checkpointing` is deprecated",
    category=FutureWarning,
    module=r"transformers\.modeling_utils",
)
# huggingface_hub's loggers print through a handler of their own and also pass each record on
# to the root logger, which the CLI gives a handler: every hub warning appeared twice.
logging.getLogger("huggingface_hub").propagate = False
