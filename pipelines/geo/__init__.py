"""Where and when: query filters (bbox, near, time window), GeoParquet footprint columns, GeoJSON hits.

Pure functions over numpy, pyarrow, shapely and pyproj; imports `pipelines.errors` only, so the store, the
search package and the CLI can all use it without importing each other.
"""
