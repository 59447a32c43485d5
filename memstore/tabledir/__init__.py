"""The table directory: its files, manifest, checkpoint, sequence lock, writer lock, staging and durable writes.

Every on-disk name and format of a table directory is owned by a module here (docs/format.md
describes them for users): `names` (every file and directory name), `manifest` (and `optimizer`,
its optimizer section), `checkpoint`, `seqlock`, `lock` (the directory flock and ``writer.lock``),
`fsafe` (file modes, temp files, the one durable write), `staging` (building a table beside its
path and moving it into place), `sums` (the checksum sidecars), `walformat` (the write-ahead
log's segments and frames; `record`, the push record they carry). Importing this package loads
nothing heavy: a client that maps a table on its own host needs only these modules and the row
stores.
"""
