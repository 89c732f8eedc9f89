"""One module per external system: Prefect, the Supabase Management API, the database (all SQL), git."""
