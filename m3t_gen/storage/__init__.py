"""The one I/O layer: where outputs live (local or fsspec URLs), input readers, image bytes."""
