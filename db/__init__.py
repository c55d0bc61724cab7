"""SQL schema, sessions, queries and migrations: the source of truth for jobs and instances."""
