"""The toy world's research code (docs/toy.md): build the checkpoints, run the experiments."""
