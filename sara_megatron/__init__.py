"""SARA: Semantically Anchored Routing Alignment on Megatron-Core."""

import warnings

__version__ = "0.1.0"

# Warnings megatron-core and torch print on every start of a CPU (or TE-less) run, for fallbacks
# this package handles on purpose; `initialize_distributed` names those fallbacks in one log line
# instead. Matched by message and category so that any other warning still shows. Installed here
# because every tool imports this package before megatron-core.
KNOWN_START_UP_WARNINGS = (
    (UserWarning, r"Transformer Engine and Apex are not installed"),
    # torch's `checkpoint.load_state_dict`, called by megatron-core's dist_checkpointing.
    (FutureWarning, r"`load_state_dict` is deprecated and will be removed in future versions"),
)

for _category, _message in KNOWN_START_UP_WARNINGS:
    warnings.filterwarnings("ignore", message=_message, category=_category)
