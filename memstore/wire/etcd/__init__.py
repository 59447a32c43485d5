"""Generated gRPC stubs for etcd 3.4's v3 API (proto/memstore/wire/etcd/); regenerate with scripts/gen_proto.py."""
