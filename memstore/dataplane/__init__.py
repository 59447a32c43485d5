"""The data plane: lookups' rows over a framed TCP stream, beside the gRPC control plane.

gRPC stays the control plane (Describe, tickets, pushes, errors, health, metrics). Python gRPC's
HTTP/2 transport moves rows at about a quarter of in-process speed; a plain socket that the client
reads straight into its output buffer moves them at close to memory speed. `frames` is the wire
format both ends share (docs/format.md specifies it), `tickets` the daemon's short-lived session
tickets, `server` the daemon's listener; `client.dataplane` is the client's side.
"""
