"""The table directory: its files, manifest, checkpoint, sequence lock, writer lock and durable writes.

Every on-disk name and format of a table directory is owned by a module here (docs/format.md
describes them for users). Importing this package loads nothing heavy: a client that maps a
table on its own host needs only these modules and the row stores.
"""
