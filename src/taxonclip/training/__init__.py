"""The parts of a training, by concern; `taxonclip.train.run_training` puts them together.

- `data`: the training rows, their labels, each epoch's steps and batches;
- `loop`: the state, one optimiser step, one epoch;
- `rng`: seeding, and the random states a checkpoint keeps;
- `checkpoint`: a checkpoint's content, and the run's checkpoint files;
- `context`: what the steps work with besides the state (frozen);
- `resume`: what a resumed run continues with;
- `selection`: validation per epoch and the choice of the run's epoch;
- `cluster_labels`: label=cluster's k-means labels.
"""
