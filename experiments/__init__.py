"""The RL-vs-SFT expert testbed (issue 7): tasks, training, merging, evaluation."""
