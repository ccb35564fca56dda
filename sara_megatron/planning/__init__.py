"""Planning a run on the CPU: exact per-rank parameter counts, memory per GPU of every layout,
and the converter's mapping checked at full size, all from meta-device models (no weights)."""
