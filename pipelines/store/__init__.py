"""The embedding store: `schema` (layout names, columns, Arrow schema), `manifest` (the commit mechanism),
`reader` (versions and snapshots), `writer` (staging and merging commits). See docs/store.md."""
