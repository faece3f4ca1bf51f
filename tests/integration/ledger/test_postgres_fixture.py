"""The PostgreSQL fixture itself: a real server, a fresh database per test, torn down at the end."""

import os

from sqlalchemy import create_engine, text

from tests.postgres import PostgresCluster, find_bindir


def test_each_test_gets_a_fresh_database_on_a_real_server(postgres_cluster: PostgresCluster, postgres_url: str) -> None:
    engine = create_engine(postgres_url)
    with engine.begin() as conn:
        version = conn.execute(text("SELECT current_setting('server_version_num')::int")).scalar()
        assert version is not None and version >= 130000  # DROP DATABASE ... WITH (FORCE)
        assert conn.execute(text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")).scalar() == 0
        conn.execute(text("CREATE TABLE t (x int)"))
    engine.dispose()
    assert os.path.exists(os.path.join(postgres_cluster.socket_dir, f".s.PGSQL.{postgres_cluster.port}"))


def test_a_dropped_database_is_gone(postgres_cluster: PostgresCluster) -> None:
    name = postgres_cluster.create_database()
    postgres_cluster.drop_database(name)
    engine = create_engine(postgres_cluster.url())
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM pg_database WHERE datname = :n"), {"n": name}).scalar() == 0
    engine.dispose()


def test_a_cluster_found_outside_path_starts_as_an_unprivileged_user_and_is_removed_when_stopped(
    monkeypatch,  # type: ignore[no-untyped-def]
) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # Debian keeps initdb in /usr/lib/postgresql/<v>/bin only
    bindir = find_bindir()
    assert bindir is not None and (bindir / "pg_ctl").exists()
    cluster = PostgresCluster.start(bindir)
    try:
        owner = os.stat(cluster.data_dir).st_uid
        assert owner != 0 or os.geteuid() != 0  # as root, the cluster belongs to `nobody`
        engine = create_engine(cluster.url())
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
        engine.dispose()
    finally:
        cluster.stop()
    assert not os.path.exists(cluster.root)
