"""Corpus construction (paper §3.1, Appendix A.1/A.7): anchor sources, the model's answers, the
correctness filter, decontamination against the evaluation sets, and translation."""
