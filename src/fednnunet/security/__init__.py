"""Transport security: certificates, site keys."""
