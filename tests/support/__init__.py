"""Helpers for the tests that run real processes: ``processes`` (process control by PID, ports,
logs, the file-access audit), ``flower`` (SuperLink / SuperNode deployments, ``flwr run``, run
status) and ``keys`` (TLS certificates, SuperNode authentication keys)."""
