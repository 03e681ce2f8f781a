"""cluster.tracking_server never takes a database password in a URI (where process
listings and logs would show it). The server on a real PostgreSQL, restarted with the
database, is exercised by tests/test_retrain.py."""

from __future__ import annotations

from cluster import tracking_server


def test_a_password_in_the_uri_is_refused_without_being_echoed(capsys):
    assert tracking_server.main(["--backend-store-uri", "postgresql://postgres:hunter2@127.0.0.1:1/mlflow"]) == 2
    err = capsys.readouterr().err
    assert "PGPASSWORD or --password-file" in err and "hunter2" not in err and "postgres:***@" in err
