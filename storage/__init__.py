"""PostgreSQL and Redis: the connection pool, SQL query files, one repository module per aggregate, and
the quota scripts."""
