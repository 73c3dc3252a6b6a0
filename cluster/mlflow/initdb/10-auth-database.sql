-- Runs once, when the PostgreSQL volume is first created: the basic-auth app keeps its users
-- and permissions in a database of its own (both stores use Alembic, whose version tables
-- would collide in one database).
CREATE DATABASE mlflow_auth OWNER mlflow;
