"""Training experiments: fold rules, feature stages, algorithms and their evaluation."""
