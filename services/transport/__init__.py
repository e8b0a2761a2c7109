"""Redis Streams transport shared by the services (queues, leases, dead letters)."""
