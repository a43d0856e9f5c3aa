"""The core layer: errors, labels, artefact layout, geometry helpers, device choice, typed
artefacts and the parallel map. It imports nothing of autoliver above it (only ``planning``)."""
