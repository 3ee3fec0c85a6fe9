"""Benchmark harness: PostgreSQL direct vs PgBouncer vs threadpool_proxy (run with bench/run)."""
