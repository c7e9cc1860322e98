"""Names every layer shares: errors, parameter roles by path, telemetry collections."""
