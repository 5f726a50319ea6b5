"""The gateway's way to Triton over gRPC: the endpoints and their health and load (pool.py), the calls
(backend.py: GrpcTritonBackend, the TritonBackend of gateway/backend.py)."""
