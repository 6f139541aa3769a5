"""Bootstrap code every Switchboard service uses the same way, and nothing domain-specific:
structured logs, the process lifecycle (SIGTERM), the gRPC server with health checking and
reflection, the NATS connection, and the one table of typed errors."""
