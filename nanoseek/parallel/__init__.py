"""Parallel training on torch.distributed: mesh, expert parallelism, FSDP2, pipeline schedules, sharded
checkpoints and the `nanoseek plan` estimator. The model is wrapped from outside; see docs/parallel.md."""
