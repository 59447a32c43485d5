"""The push record: one push's after-image, the payload of every write-ahead-log entry and of the Follow stream.

A trainable table logs each push as one record before applying it (memstore.wal frames it with the
version it produces and a CRC); recovery and snapshots replay records in order, and a primary streams
the very same bytes to its replicas (`ReplicatedRecord.payload` in proto/memstore/wire/memstore.proto),
which log and apply them unchanged. A record holds *after-images* (the rows and optimizer state as
the push left them, not the gradients), so applying one twice is harmless.

Byte layout (format 2, written by this memstore; all integers little-endian)::

    offset  size  type  field
         0     4  u32   format        2
         4     8  u64   marker        0 (where a format-1 record holds its layer step, never 0)
        12     4  u32   layer_id      the Engram layer pushed
        16     8  u64   layer_step    the layer's optimizer step count after this push (1 for its first)
        24     8  i64   step_id       the client's step id (0: none; a retry of an applied step id is
                                      answered again, not applied)
        32     8  u64   count         N, the rows in the push
        40     2  u16   client_len    C, bytes of the client id
        42     C  utf8  client_id     who pushed ("" for none); at most 65535 bytes
     42+C   8*N  i64   ids           the rows' indices in the table directory (its shard's own rows)
            N*R        rows          the rows after the push in the table's storage dtype, R = the
                                      manifest's `dtype.row_bytes(dim)` (float32/float16: IEEE,
                                      bfloat16: the high 16 bits of float32, quantized: codes then
                                      the row's float32 scale), little-endian
            N*W*4 f32  state         for each optimizer state slot in sorted name order, its values
                                      after the push: W = the slot's width (memstore.optim
                                      `state_slots`: dim or 1), N rows of W float32s

and nothing after. The sizes of the rows and state are not in the record: they follow from the
table's manifest (dtype, dim, optimizer), which a reader has, and which a primary and its replicas
share (Follow refuses a replica whose manifest differs). A decoder checks that the record ends
exactly where the manifest says.

Format 1 (written by earlier memstores, still read: their logs replay unchanged) is the same record
without the first 12 bytes: it starts with `layer_id` at offset 0.

How the format is carried: in the record itself, because the Follow stream sends records without
the log's framing (the log's segment and frame headers carry the log's own format, not the
payload's). A format-2-or-later record starts with its format as a u32, then eight zero bytes: in
a format-1 record those eight bytes are its `layer_step`, which is at least 1 for every push (the
count of the layer's steps after it), so no format-1 record starts that way, whatever its layer id
(any u32 is a valid layer id, so the first four bytes alone could not tell them apart). A record
of a format this memstore does not know is refused (DataLossError naming it), never misread.
Consequence for upgrades: a daemon of an earlier memstore cannot read format-2 records, so replicas
are upgraded before their primary, and a table whose log holds records past its checkpoint (an
unclean stop) is opened by this memstore or a later one (a clean stop checkpoints and empties the log).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from memstore.errors import DataLossError, InvalidArgumentError
from memstore.tabledir.manifest import Manifest

if TYPE_CHECKING:
    from memstore.storage.base import RowStore

FORMAT = 2  # what `encode` writes
MAX_CLIENT_ID_BYTES = (1 << 16) - 1  # the header's client id length is 16 bits
_PREFIX = struct.Struct("<IQ")  # format, marker (0): absent in format 1
_HEADER = struct.Struct("<IQqQH")  # layer_id, layer_step, step_id, count, client_len
PREFIX_SIZE = _PREFIX.size  # 12


@dataclass
class PushRecord:
    """One push's after-image: the rows and optimizer state of `ids` as the push left them."""

    layer_id: int
    layer_step: int  # the layer's step count after this push
    step_id: int  # the client's step id (0: none)
    client_id: str
    ids: np.ndarray  # int64 [N], the table directory's own row indices
    rows: np.ndarray  # [N, stored width] in the storage dtype
    state: dict[str, np.ndarray]  # slot -> float32 [N, slot width]

    def encode(self) -> bytes:
        """The record in the current format (module docstring); InvalidArgumentError for a client id
        over MAX_CLIENT_ID_BYTES."""
        client = encode_client_id(self.client_id)
        header = _HEADER.pack(self.layer_id, self.layer_step, self.step_id, len(self.ids), len(client))
        parts = [_PREFIX.pack(FORMAT, 0), header, client, np.asarray(self.ids).astype("<i8").tobytes()]
        parts.append(np.ascontiguousarray(self.rows).tobytes())
        parts += [np.ascontiguousarray(self.state[slot], dtype="<f4").tobytes() for slot in sorted(self.state)]
        return b"".join(parts)

    @classmethod
    def decode(cls, payload: bytes, manifest: Manifest) -> PushRecord:
        """A record of any readable format, for a table described by `manifest`; the arrays are
        read-only views of `payload`. DataLossError when it is not a whole record of this table
        (or writes rows outside its layer)."""
        view = memoryview(payload)
        offset = 0
        if len(view) >= _PREFIX.size and _PREFIX.unpack_from(view)[1] == 0:  # a prefix: format 2 or later
            fmt = _PREFIX.unpack_from(view)[0]
            if fmt != FORMAT:
                raise DataLossError(
                    f"a push record names format {fmt}, "
                    + (
                        "which this memstore does not read (it reads formats 1 and 2): it was written by a newer "
                        "memstore, so upgrade this one"
                        if fmt > FORMAT
                        else "which has no such prefix: the record is damaged"
                    )
                )
            offset = _PREFIX.size
        try:
            record = cls._decode_body(view, offset, manifest)
        except (struct.error, ValueError, InvalidArgumentError) as exc:  # truncated, bad layer, bad client id
            raise DataLossError(f"a push record is malformed: {exc}") from None
        stored = manifest.stored_rows(record.layer_id)
        if len(record.ids) and not (0 <= int(record.ids.min()) and int(record.ids.max()) < stored):
            raise DataLossError(f"a push record writes rows outside layer {record.layer_id}'s {stored} rows")
        return record

    @classmethod
    def _decode_body(cls, payload: memoryview, offset: int, manifest: Manifest) -> PushRecord:
        layer_id, step, step_id, count, client_len = _HEADER.unpack_from(payload, offset)
        offset += _HEADER.size
        client = payload[offset : offset + client_len]
        if len(client) != client_len:
            raise ValueError(f"the client id is cut short ({len(client)} of {client_len} bytes)")
        client_id = bytes(client).decode()
        offset += client_len
        dim = manifest.dtype.stored_width(manifest.layout.dim)  # stored units per row
        state_widths = sorted((slot, width) for slot, (_, width) in manifest.state_files(layer_id).items())
        ids = np.frombuffer(payload, dtype="<i8", count=count, offset=offset)
        offset += ids.nbytes
        rows = np.frombuffer(payload, dtype=manifest.dtype.numpy, count=count * dim, offset=offset).reshape(count, dim)
        offset += rows.nbytes
        state = {}
        for slot, width in state_widths:
            values = np.frombuffer(payload, dtype="<f4", count=count * width, offset=offset)
            state[slot] = values.reshape(count, width)
            offset += values.nbytes
        if offset != len(payload):
            raise ValueError(f"a record of layer {layer_id} has {len(payload) - offset} unexpected bytes")
        return cls(layer_id, step, step_id, client_id, ids, rows, state)

    def reserve(self, rows: RowStore, state: Mapping[str, RowStore]) -> None:
        """Disk space for `write_to` in the layer's row store and state stores (DiskFullError when there
        is none); writes nothing."""
        rows.reserve(self.ids)
        for slot in self.state:
            state[slot].reserve(self.ids)

    def write_to(self, rows: RowStore, state: Mapping[str, RowStore]) -> None:
        """Write the after-image: the rows into the layer's row store, the optimizer state into its state stores."""
        rows.update(self.ids, self.rows)
        for slot, values in self.state.items():
            state[slot].update(self.ids, values)


def encode_client_id(client_id: str) -> bytes:
    """The client id as a record stores it; InvalidArgumentError when it is over MAX_CLIENT_ID_BYTES
    (cutting it could split a UTF-8 character, and the record could never be read back)."""
    client = client_id.encode()
    if len(client) > MAX_CLIENT_ID_BYTES:
        raise InvalidArgumentError(
            f"client_id is {len(client)} bytes of UTF-8; at most {MAX_CLIENT_ID_BYTES}: name the client more briefly"
        )
    return client
