-- The postgres service's healthcheck (docker-compose.yml), run by its superuser over the
-- container's socket once pg_isready has answered on TCP (the image's temporary init
-- server listens on the socket only: a TCP answer means db/init is over).
-- Over is not done: a script that fails stops the entrypoint, and the restarted
-- container skips db/init (its data folder is no longer empty), then serves a cluster
-- without Prefect's database or the runner's login. 000_prefect_db.sh makes the first,
-- 002_ingest_login.sh, the last script, the second: both there, db/init finished.
DO $check$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_database WHERE datname = 'prefect')
     OR NOT EXISTS (
       SELECT FROM pg_catalog.pg_auth_members AS m
       JOIN pg_catalog.pg_roles AS grp ON grp.oid = m.roleid
       JOIN pg_catalog.pg_roles AS login ON login.oid = m.member
       WHERE grp.rolname = 'streamflow_ingest' AND login.rolcanlogin
     )
  THEN
    RAISE EXCEPTION 'db/init did not finish on this volume: its first start''s log says why '
      '(docker compose logs postgres); fix .env, then docker compose down -v (this deletes '
      'the database volume) and docker compose up -d --wait';
  END IF;
END
$check$;
