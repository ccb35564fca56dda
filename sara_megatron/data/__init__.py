"""SARA's training data: the parallel corpus format and its validation, token shards, and the
data loader that reads anchor priors alongside the tokens."""
