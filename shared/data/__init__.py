"""BraTS cases on disk: discovery, checks, volumes, transforms, datasets, partitions, the phantom."""
