"""The doit graph and its machinery: the build's variables, where artifacts live, the task
generators, task state and code keys, the memory budget and where heavy work runs."""
