"""Server-side federation jobs, independent of the transport."""
