"""Distributed training on Ray Train: `options` (TrainOptions), `cli` (`ssjdn train` = `python -m pipelines.train`),
`driver` (preflight, TorchTrainer), `worker` (the loop of every rank), `data` (shards per rank, batches), `spec`
(what travels to the workers), `rundir` (the run folder), `submit` (Ray job submission), `hooks` + `faults` (the
step hook and the tests' fault injection)."""
