"""Credentials out of URIs (core/uris.py), checked against how the libraries that read the URIs parse them."""
import pytest
from sqlalchemy.engine import make_url

from bin_counter.core.uris import has_credentials, redact_uri


@pytest.mark.parametrize("password", ["s3cr/et", "a?b", "c#d", "x:y", "/?#", "p/w?x=1#frag", "plain"])
def test_passwords_with_slash_question_mark_or_hash_are_masked(password):
    url = f"postgresql://bob:{password}@db.example.com:5432/optuna"
    assert make_url(url).password == password  # SQLAlchemy (so Optuna) takes it unencoded
    assert redact_uri(url) == "postgresql://bob:***@db.example.com:5432/optuna"
    assert redact_uri(url, drop=True) == "postgresql://db.example.com:5432/optuna"
    message = f"cannot open Optuna storage '{url}': connection refused"
    assert password not in redact_uri(message) and has_credentials(url)


def test_uris_without_a_password_keep_their_form():
    for uri in ("http://127.0.0.1:5000/", "http://127.0.0.1:5000/#/models/m", "sqlite:///optuna.db",
                "models:/m@champion"):
        assert redact_uri(uri) == uri and not has_credentials(uri)
    assert redact_uri("postgresql://bob@db/optuna") == "postgresql://***@db/optuna"  # a bare user@ may be a token
