"""Image, dataset and artefact I/O."""
