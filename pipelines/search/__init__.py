"""Search over store snapshots: `query` (the front door: QueryOptions, query_store), `scan`, `matrix_cache`,
`ann`, `topk` (the block top-k they share), `where` (the filter grammar), `cli` (`ssjdn query`)."""
