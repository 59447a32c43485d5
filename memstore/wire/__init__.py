"""Generated gRPC stubs for proto/memstore/wire/memstore.proto; regenerate with scripts/gen_proto.py."""
