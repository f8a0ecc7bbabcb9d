"""On-disk and on-wire formats: checkpoints, model metadata, teacher top-k, the teacher cache."""
