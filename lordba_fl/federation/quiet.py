"""Known third-party noise, silenced where the Flower apps and the launcher start.

Importing :mod:`lordba_fl` as a library changes no warning filter and no logger: a user's own
program sees every warning its dependencies raise. The ServerApp and ClientApp call
:func:`quiet_dependencies` when they load (the app boundary), and the launcher drops the known
lines of Flower's own processes from the stream it shows (:func:`is_noise`). Each entry names what
it silences; ``LORDBA_FL_VERBOSE=1`` turns all of it off.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

# (category, message regex, why it is safe to hide)
KNOWN_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (DeprecationWarning, r"`torch\.jit\.script_method` is deprecated",
     "raised while a dependency is imported; nothing here scripts with torch.jit"),
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated",
     "PEFT reads transformers' old attribute name when it wraps a model"),
    (UserWarning, r"Unsupported layer type '<class 'lordba_fl\.",
     "PEFT does not know the quantized base layers; their LoRA wrapper is the plain-Linear one, tested"),
)

# logger name -> message prefixes dropped from it
KNOWN_LOG_RECORDS: dict[str, tuple[str, ...]] = {
    # bitsandbytes looks for an optional CPU kernel package on import; its fallback is what runs here
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
}

# lines of Flower's CLI / simulation process and Ray that say nothing about the run
NOISE = re.compile("|".join((
    r"Since flwr 1\.32, default simulated SuperNodes changed",
    r"^Using SuperLink: ", r"^Successfully started run ", r"Starting logstream for run_id",
    r"Starting Flower Simulation", r"Federation `[^`]*` \(\d+ simulated SuperNodes\)",
    r"To change federation size", r"flwr federation simulation-config", r"^Successfully installed \S+ to ",
    r"Manually terminating ClientAppActor", r"FutureWarning: Tip: In future versions of Ray",
    r"Failed to load CPU gemm_4bit_forward", r"DeprecationWarning: `torch\.jit\.script_method` is deprecated",
    r"FutureWarning: `is_gradient_checkpointing` is deprecated", r"Generating partition_id_to_indices",
    r"^\W*INFO\W*:\s*$",  # Flower's empty INFO separator lines
)))
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def verbose() -> bool:
    return os.environ.get("LORDBA_FL_VERBOSE", "") not in ("", "0", "false")


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_dependencies(flower_info: bool = True) -> None:
    """Hide :data:`KNOWN_WARNINGS` and :data:`KNOWN_LOG_RECORDS`; with ``flower_info=False`` (the
    ServerApp: the run prints its own line per round) also Flower's INFO logs in this process.
    Idempotent; nothing when ``LORDBA_FL_VERBOSE`` is set."""
    if verbose():
        return
    for category, message, _why in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, prefixes in KNOWN_LOG_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefixes) for f in logger.filters):
            logger.addFilter(_DropPrefixes(prefixes))
    if not flower_info:
        logging.getLogger("flwr").setLevel(logging.WARNING)


def is_noise(line: str) -> bool:
    """True for a known line of Flower's or Ray's own output (see :data:`NOISE`), and for the
    ``warnings.warn(`` source line Python prints under a warning."""
    text = _ANSI.sub("", line).strip()
    text = re.sub(r"^\(\w+ pid=\d+\)\s*", "", text)  # Ray's prefix on a worker's lines
    return bool(NOISE.search(text)) or text == "warnings.warn("
