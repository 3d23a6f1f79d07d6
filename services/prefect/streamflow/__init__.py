"""StreamFlow ingest: monthly CSV exports -> validated, atomic, as_of-snapshotted PostgreSQL."""
