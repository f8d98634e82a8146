"""The run directory's checkpoint format, shared by training (`train.checkpoint` writes and resumes)
and serving (`serving.model` reads): file names, the meta schema, discovery, expert-shard reading.
No DeepSpeed and no process group: a fresh serving process reads checkpoints with this alone."""
