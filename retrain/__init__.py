"""driftloop retrain: policy, training, evaluation and promotion."""
