"""The embedded default job: the whole MetaQuery chain in the offline toy world, on a CPU."""
