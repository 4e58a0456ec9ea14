"""Third-party output that tells an afina user nothing, switched off for the CLI (`afina -v` keeps it all).

- transformers' progress bars ("Loading weights", "Writing model shards") and its info/warning logs about
  loading details afina handles itself (e.g. a new classification head's untrained weights): the bars go
  through huggingface_hub's switch, the logs through transformers' verbosity;
- the `kernels` package's "Skipping publisher trust check ... offline mode" and bitsandbytes' "Failed to load
  CPU gemm_4bit_forward from kernels-community": on a CPU with AVX512-BF16, importing bitsandbytes tries to
  fetch an optional fast 4-bit kernel from the Hugging Face Hub, which offline fails, and bitsandbytes then
  uses its own built-in kernel, so QLoRA works either way. Both become one afina line under `-v`;
- llama.cpp's own log (through llama-cpp-python's logger), e.g. a "warning: ... falling back to q5_0" line
  per tensor while quantizing: afina records each fallback in the manifest and the export summary;
- peft's FutureWarning about a property transformers renamed (neither the user's code nor afina's).

Environment variables are used where a library reads its setting at import (so the libraries need not be
imported here, and the stage subprocesses the studio starts inherit them); a library already imported is
switched directly.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

LOUD_LOGGERS = ("bitsandbytes", "kernels", "llama-cpp-python")
# The modules that log the kernel-fetch lines (a logger's filter sees only records logged on it, not its children's).
KERNEL_FETCH_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")
log = logging.getLogger("afina")


class _OptionalKernelNote(logging.Filter):
    """bitsandbytes' and kernels' lines about the optional kernel hub fetch, as one afina line (at INFO)."""

    said = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "gemm_4bit_forward" in message or "publisher trust check" in message:
            if not _OptionalKernelNote.said:
                _OptionalKernelNote.said = True
                log.info(
                    "bitsandbytes' optional fast CPU 4-bit kernel (kernels-community, on the Hugging Face Hub) "
                    "is not available here; QLoRA uses bitsandbytes' built-in kernel"
                )
            return False
        return True


def quiet_third_party(verbose: bool = False) -> None:
    """Silence third-party bars and warnings; with `verbose`, keep them and only fold the kernel-fetch lines
    into one afina line."""
    for name in KERNEL_FETCH_LOGGERS:
        logging.getLogger(name).addFilter(_OptionalKernelNote())
    if verbose:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()
    for name in LOUD_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
