"""tile: satellite scenes (GeoTIFF/COG, STAC) -> WebDataset shards of georeferenced chips (docs/tiling.md)."""
