from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT8_E4M3_ROWSCALE: _ClassVar[DType]
    DTYPE_INT8_ROWSCALE: _ClassVar[DType]
    DTYPE_BYTES: _ClassVar[DType]

class ReplicationRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPLICATION_ROLE_UNSPECIFIED: _ClassVar[ReplicationRole]
    REPLICATION_ROLE_STANDALONE: _ClassVar[ReplicationRole]
    REPLICATION_ROLE_PRIMARY: _ClassVar[ReplicationRole]
    REPLICATION_ROLE_REPLICA: _ClassVar[ReplicationRole]

class SyncTimeoutPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SYNC_TIMEOUT_POLICY_UNSPECIFIED: _ClassVar[SyncTimeoutPolicy]
    SYNC_TIMEOUT_POLICY_FAIL: _ClassVar[SyncTimeoutPolicy]
    SYNC_TIMEOUT_POLICY_DEGRADE: _ClassVar[SyncTimeoutPolicy]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT8_E4M3_ROWSCALE: DType
DTYPE_INT8_ROWSCALE: DType
DTYPE_BYTES: DType
REPLICATION_ROLE_UNSPECIFIED: ReplicationRole
REPLICATION_ROLE_STANDALONE: ReplicationRole
REPLICATION_ROLE_PRIMARY: ReplicationRole
REPLICATION_ROLE_REPLICA: ReplicationRole
SYNC_TIMEOUT_POLICY_UNSPECIFIED: SyncTimeoutPolicy
SYNC_TIMEOUT_POLICY_FAIL: SyncTimeoutPolicy
SYNC_TIMEOUT_POLICY_DEGRADE: SyncTimeoutPolicy

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("manifest_json", "fingerprint", "limits", "server_version", "same_host", "version", "trainable", "replication", "data_plane")
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    SAME_HOST_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_FIELD_NUMBER: _ClassVar[int]
    DATA_PLANE_FIELD_NUMBER: _ClassVar[int]
    manifest_json: str
    fingerprint: str
    limits: ServerLimits
    server_version: str
    same_host: SameHostAccess
    version: int
    trainable: bool
    replication: Replication
    data_plane: DataPlaneOffer
    def __init__(self, manifest_json: _Optional[str] = ..., fingerprint: _Optional[str] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ..., server_version: _Optional[str] = ..., same_host: _Optional[_Union[SameHostAccess, _Mapping]] = ..., version: _Optional[int] = ..., trainable: _Optional[bool] = ..., replication: _Optional[_Union[Replication, _Mapping]] = ..., data_plane: _Optional[_Union[DataPlaneOffer, _Mapping]] = ...) -> None: ...

class DataPlaneOffer(_message.Message):
    __slots__ = ("port", "host", "tls", "protocol")
    PORT_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    TLS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    port: int
    host: str
    tls: bool
    protocol: int
    def __init__(self, port: _Optional[int] = ..., host: _Optional[str] = ..., tls: _Optional[bool] = ..., protocol: _Optional[int] = ...) -> None: ...

class OpenDataPlaneRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OpenDataPlaneResponse(_message.Message):
    __slots__ = ("ticket", "expires_in_s")
    TICKET_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    ticket: bytes
    expires_in_s: float
    def __init__(self, ticket: _Optional[bytes] = ..., expires_in_s: _Optional[float] = ...) -> None: ...

class Replication(_message.Message):
    __slots__ = ("role", "primary_address", "applied_version", "primary_version", "lag_versions", "seconds_since_contact", "followers", "serving", "problem", "sync_replicas", "sync_timeout_policy", "acknowledged_version", "sync_degraded", "replicas", "epoch", "election_state")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_VERSION_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAG_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_CONTACT_FIELD_NUMBER: _ClassVar[int]
    FOLLOWERS_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    SYNC_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    SYNC_TIMEOUT_POLICY_FIELD_NUMBER: _ClassVar[int]
    ACKNOWLEDGED_VERSION_FIELD_NUMBER: _ClassVar[int]
    SYNC_DEGRADED_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ELECTION_STATE_FIELD_NUMBER: _ClassVar[int]
    role: ReplicationRole
    primary_address: str
    applied_version: int
    primary_version: int
    lag_versions: int
    seconds_since_contact: float
    followers: int
    serving: bool
    problem: str
    sync_replicas: int
    sync_timeout_policy: SyncTimeoutPolicy
    acknowledged_version: int
    sync_degraded: bool
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaDurability]
    epoch: int
    election_state: str
    def __init__(self, role: _Optional[_Union[ReplicationRole, str]] = ..., primary_address: _Optional[str] = ..., applied_version: _Optional[int] = ..., primary_version: _Optional[int] = ..., lag_versions: _Optional[int] = ..., seconds_since_contact: _Optional[float] = ..., followers: _Optional[int] = ..., serving: _Optional[bool] = ..., problem: _Optional[str] = ..., sync_replicas: _Optional[int] = ..., sync_timeout_policy: _Optional[_Union[SyncTimeoutPolicy, str]] = ..., acknowledged_version: _Optional[int] = ..., sync_degraded: _Optional[bool] = ..., replicas: _Optional[_Iterable[_Union[ReplicaDurability, _Mapping]]] = ..., epoch: _Optional[int] = ..., election_state: _Optional[str] = ...) -> None: ...

class ReplicaDurability(_message.Message):
    __slots__ = ("replica_id", "durable_version", "seconds_since_report")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    DURABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_REPORT_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    durable_version: int
    seconds_since_report: float
    def __init__(self, replica_id: _Optional[str] = ..., durable_version: _Optional[int] = ..., seconds_since_report: _Optional[float] = ...) -> None: ...

class ConfirmDurableRequest(_message.Message):
    __slots__ = ("replica_id", "durable_version", "fingerprint")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    DURABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    durable_version: int
    fingerprint: str
    def __init__(self, replica_id: _Optional[str] = ..., durable_version: _Optional[int] = ..., fingerprint: _Optional[str] = ...) -> None: ...

class ConfirmDurableResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class SameHostAccess(_message.Message):
    __slots__ = ("host_id", "table_dir", "files", "seqlock_path", "row_cache")
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    TABLE_DIR_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    SEQLOCK_PATH_FIELD_NUMBER: _ClassVar[int]
    ROW_CACHE_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    table_dir: str
    files: _containers.RepeatedCompositeFieldContainer[LayerFile]
    seqlock_path: str
    row_cache: RowCacheFile
    def __init__(self, host_id: _Optional[str] = ..., table_dir: _Optional[str] = ..., files: _Optional[_Iterable[_Union[LayerFile, _Mapping]]] = ..., seqlock_path: _Optional[str] = ..., row_cache: _Optional[_Union[RowCacheFile, _Mapping]] = ...) -> None: ...

class RowCacheFile(_message.Message):
    __slots__ = ("path", "device", "inode")
    PATH_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    INODE_FIELD_NUMBER: _ClassVar[int]
    path: str
    device: int
    inode: int
    def __init__(self, path: _Optional[str] = ..., device: _Optional[int] = ..., inode: _Optional[int] = ...) -> None: ...

class LayerFile(_message.Message):
    __slots__ = ("layer_id", "path", "device", "inode")
    LAYER_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    INODE_FIELD_NUMBER: _ClassVar[int]
    layer_id: int
    path: str
    device: int
    inode: int
    def __init__(self, layer_id: _Optional[int] = ..., path: _Optional[str] = ..., device: _Optional[int] = ..., inode: _Optional[int] = ...) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_rows_per_request", "chunk_bytes", "max_message_bytes", "max_concurrent_calls", "max_in_flight_bytes")
    MAX_ROWS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_CALLS_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_rows_per_request: int
    chunk_bytes: int
    max_message_bytes: int
    max_concurrent_calls: int
    max_in_flight_bytes: int
    def __init__(self, max_rows_per_request: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_concurrent_calls: _Optional[int] = ..., max_in_flight_bytes: _Optional[int] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("layer_id", "row_ids")
    LAYER_ID_FIELD_NUMBER: _ClassVar[int]
    ROW_IDS_FIELD_NUMBER: _ClassVar[int]
    layer_id: int
    row_ids: bytes
    def __init__(self, layer_id: _Optional[int] = ..., row_ids: _Optional[bytes] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("dtype", "dim", "num_rows", "row_offset", "rows", "version")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    ROW_OFFSET_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    dim: int
    num_rows: int
    row_offset: int
    rows: bytes
    version: int
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., dim: _Optional[int] = ..., num_rows: _Optional[int] = ..., row_offset: _Optional[int] = ..., rows: _Optional[bytes] = ..., version: _Optional[int] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("layer_id", "row_ids", "grads", "step_id", "client_id", "lr_scale")
    LAYER_ID_FIELD_NUMBER: _ClassVar[int]
    ROW_IDS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    LR_SCALE_FIELD_NUMBER: _ClassVar[int]
    layer_id: int
    row_ids: bytes
    grads: bytes
    step_id: int
    client_id: str
    lr_scale: float
    def __init__(self, layer_id: _Optional[int] = ..., row_ids: _Optional[bytes] = ..., grads: _Optional[bytes] = ..., step_id: _Optional[int] = ..., client_id: _Optional[str] = ..., lr_scale: _Optional[float] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("version", "layer_step")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LAYER_STEP_FIELD_NUMBER: _ClassVar[int]
    version: int
    layer_step: int
    def __init__(self, version: _Optional[int] = ..., layer_step: _Optional[int] = ...) -> None: ...

class SnapshotRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class SnapshotResponse(_message.Message):
    __slots__ = ("path", "version")
    PATH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    path: str
    version: int
    def __init__(self, path: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class FollowRequest(_message.Message):
    __slots__ = ("from_version", "fingerprint", "manifest_json", "follower_id", "heartbeat_s", "last_record_sha256", "epoch")
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    FOLLOWER_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_S_FIELD_NUMBER: _ClassVar[int]
    LAST_RECORD_SHA256_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    from_version: int
    fingerprint: str
    manifest_json: str
    follower_id: str
    heartbeat_s: float
    last_record_sha256: bytes
    epoch: int
    def __init__(self, from_version: _Optional[int] = ..., fingerprint: _Optional[str] = ..., manifest_json: _Optional[str] = ..., follower_id: _Optional[str] = ..., heartbeat_s: _Optional[float] = ..., last_record_sha256: _Optional[bytes] = ..., epoch: _Optional[int] = ...) -> None: ...

class StreamSnapshotRequest(_message.Message):
    __slots__ = ("follower_id", "chunk_bytes")
    FOLLOWER_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    follower_id: str
    chunk_bytes: int
    def __init__(self, follower_id: _Optional[str] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class SnapshotChunk(_message.Message):
    __slots__ = ("header", "data", "end")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    header: SnapshotStreamHeader
    data: SnapshotFileData
    end: SnapshotFileEnd
    def __init__(self, header: _Optional[_Union[SnapshotStreamHeader, _Mapping]] = ..., data: _Optional[_Union[SnapshotFileData, _Mapping]] = ..., end: _Optional[_Union[SnapshotFileEnd, _Mapping]] = ...) -> None: ...

class SnapshotStreamHeader(_message.Message):
    __slots__ = ("version", "fingerprint", "files", "total_bytes", "data_bytes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_BYTES_FIELD_NUMBER: _ClassVar[int]
    version: int
    fingerprint: str
    files: _containers.RepeatedCompositeFieldContainer[SnapshotFile]
    total_bytes: int
    data_bytes: int
    def __init__(self, version: _Optional[int] = ..., fingerprint: _Optional[str] = ..., files: _Optional[_Iterable[_Union[SnapshotFile, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., data_bytes: _Optional[int] = ...) -> None: ...

class SnapshotFile(_message.Message):
    __slots__ = ("path", "size", "data_bytes")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_BYTES_FIELD_NUMBER: _ClassVar[int]
    path: str
    size: int
    data_bytes: int
    def __init__(self, path: _Optional[str] = ..., size: _Optional[int] = ..., data_bytes: _Optional[int] = ...) -> None: ...

class SnapshotFileData(_message.Message):
    __slots__ = ("file", "offset", "data")
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    file: int
    offset: int
    data: bytes
    def __init__(self, file: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class SnapshotFileEnd(_message.Message):
    __slots__ = ("file", "sha256")
    FILE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    file: int
    sha256: bytes
    def __init__(self, file: _Optional[int] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class FollowResponse(_message.Message):
    __slots__ = ("records", "primary_version", "epoch")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[ReplicatedRecord]
    primary_version: int
    epoch: int
    def __init__(self, records: _Optional[_Iterable[_Union[ReplicatedRecord, _Mapping]]] = ..., primary_version: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class ReplicatedRecord(_message.Message):
    __slots__ = ("version", "payload")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    version: int
    payload: bytes
    def __init__(self, version: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...

class WatchRowsRequest(_message.Message):
    __slots__ = ("from_version", "layer_ids", "heartbeat_s")
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAYER_IDS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_S_FIELD_NUMBER: _ClassVar[int]
    from_version: int
    layer_ids: _containers.RepeatedScalarFieldContainer[int]
    heartbeat_s: float
    def __init__(self, from_version: _Optional[int] = ..., layer_ids: _Optional[_Iterable[int]] = ..., heartbeat_s: _Optional[float] = ...) -> None: ...

class WatchRowsResponse(_message.Message):
    __slots__ = ("changes", "through_version", "table_version")
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    THROUGH_VERSION_FIELD_NUMBER: _ClassVar[int]
    TABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    changes: _containers.RepeatedCompositeFieldContainer[RowChange]
    through_version: int
    table_version: int
    def __init__(self, changes: _Optional[_Iterable[_Union[RowChange, _Mapping]]] = ..., through_version: _Optional[int] = ..., table_version: _Optional[int] = ...) -> None: ...

class RowChange(_message.Message):
    __slots__ = ("version", "layer_id", "row_ids", "rows")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LAYER_ID_FIELD_NUMBER: _ClassVar[int]
    ROW_IDS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    version: int
    layer_id: int
    row_ids: bytes
    rows: bytes
    def __init__(self, version: _Optional[int] = ..., layer_id: _Optional[int] = ..., row_ids: _Optional[bytes] = ..., rows: _Optional[bytes] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("prometheus_text",)
    PROMETHEUS_TEXT_FIELD_NUMBER: _ClassVar[int]
    prometheus_text: str
    def __init__(self, prometheus_text: _Optional[str] = ...) -> None: ...
