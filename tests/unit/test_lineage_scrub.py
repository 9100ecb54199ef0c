"""What lineage refuses to log: credentials from the environment and passwords inside URLs."""

from __future__ import annotations

from lladav.lineage import flatten, scrub


def test_env_secrets_and_url_passwords_are_blanked(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-1234567890")
    monkeypatch.setenv("HOME_DIR_NAME", "wJalrXUtnFEMI-not-secret-name")
    text = ("key wJalrXUtnFEMI/K7MDENG in s3://bucket/x, http://me:pa55word@host:5000/x "
            "and tok-1234567890")
    out = scrub(text)
    assert "wJalrXUtnFEMI/K7MDENG" not in out and "tok-1234567890" not in out
    assert "pa55word" not in out and "http://***@host:5000/x" in out
    assert "s3://bucket/x" in out


def test_short_values_and_plain_uris_survive(monkeypatch):
    # "testing" (moto's key) is too short to be told from an ordinary word in a path
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    assert scrub("s3://testing-bucket/a") == "s3://testing-bucket/a"
    assert scrub("s3://user@bucket/a") == "s3://user@bucket/a"


def test_flatten_names_params_by_path_and_caps_them(monkeypatch):
    monkeypatch.setenv("SERVICE_PASSWORD", "hunter2hunter2")
    flat = flatten({"a": {"b": 1, "c": [1, 2]}, "pw": "x hunter2hunter2", "long": "z" * 900}, "stage.")
    assert flat["stage.a.b"] == "1" and flat["stage.a.c"] == "[1, 2]"
    assert flat["stage.pw"] == "x ***"
    assert len(flat["stage.long"]) == 500
