"""persistence_svc: writes history from JetStream lifecycle events; serves it over gRPC."""
