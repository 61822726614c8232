"""Ray jobs and storage plumbing: shard, train, embed, query. Imports `ssjdn`, never `flows`."""
