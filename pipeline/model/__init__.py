"""What a model is: its config (model_configs/*.yaml), its checkpoint's files, the pieces it is
cut into and their torch modules, and the random-weight checkpoints of the tests."""
