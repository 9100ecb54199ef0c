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


# ---- lladav.secrets: more patterns, and the hooks every printed or logged message passes -----

import io  # noqa: E402
import logging  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402

from lladav import secrets  # noqa: E402

URL = "http://lladav:CANARY-pw-0123456789@127.0.0.1:5000"


@pytest.fixture
def installed(monkeypatch):
    """secrets.install() for one test; the process's hooks come back afterwards."""
    factory = logging.getLogRecordFactory()
    monkeypatch.setattr(secrets, "_factory_installed", False)
    monkeypatch.setattr(secrets, "_remembered", set())
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    secrets.install()
    yield
    logging.setLogRecordFactory(factory)


def test_passwords_in_any_scheme_and_credential_parameters():
    out = scrub("postgresql://admin:pg-Pa55@db:5432/x redis://:r3dis@cache:6379 "
                "mlflow+https://u:p@h/x https://h/a?user=me&password=hunter2&token=t0k "
                "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA&X-Amz-Signature=abc123 "
                "{'Authorization': 'Bearer eyJhbGciOi.x.y'}")
    for secret in ("pg-Pa55", "r3dis", "//u:p@", "hunter2", "t0k", "abc123", "eyJhbGciOi"):
        assert secret not in out, (secret, out)
    assert "postgresql://***@db:5432/x" in out and "redis://***@cache:6379" in out
    assert "user=me&password=***&token=***" in out and "X-Amz-Credential=AKIA" in out
    assert "'Bearer ***'" in out


def test_a_password_from_the_environment_or_a_config_is_blanked_on_its_own(monkeypatch):
    monkeypatch.setattr(secrets, "_remembered", set())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://lladav:p%40ss%2Fw0rd-long@host:5000")
    # a library's repr of its auth tuple carries the password without the URL around it
    out = scrub("auth=('lladav', 'p@ss/w0rd-long') url=http%3A%2F%2Flladav%3Ap%40ss%2Fw0rd-long")
    assert "w0rd-long" not in out
    secrets.remember("https://ci:from-the-yaml-9@mlflow.example.com")
    assert scrub("retrying with ('ci', 'from-the-yaml-9')") == "retrying with ('ci', '***')"
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "env-password-42")
    assert scrub("basic auth env-password-42") == "basic auth ***"


def test_log_records_come_out_scrubbed_with_their_tracebacks(installed):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        try:
            raise RuntimeError(f"API request to {URL}/api/2.0/mlflow/runs/get failed")
        except RuntimeError:
            # a library's child logger, propagating to a root handler installed by someone else
            logging.getLogger("somelib.module").error("call to %s failed", URL, exc_info=True)
        logging.getLogger("lladav.test").warning("stack", stack_info=True)
    finally:
        root.removeHandler(handler)
    text = stream.getvalue()
    assert "CANARY" not in text
    assert "ERROR somelib.module call to http://***@127.0.0.1:5000 failed" in text
    assert "Traceback (most recent call last)" in text
    assert "RuntimeError: API request to http://***@127.0.0.1:5000/api/2.0/mlflow/runs/get" in text


def test_warnings_and_uncaught_errors_are_scrubbed(tmp_path):
    # its own interpreter: pytest records warnings and catches exceptions before the hooks would
    script = tmp_path / "leaky.py"
    script.write_text(f"""
import threading, warnings
from lladav import secrets
secrets.install()
warnings.warn("could not reach {URL}")
def fail():
    raise OSError("{URL}")
thread = threading.Thread(target=fail)
thread.start()
thread.join()
raise ConnectionError("{URL}/api")
""")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "CANARY" not in proc.stdout + proc.stderr
    assert "UserWarning: could not reach http://***@127.0.0.1:5000" in proc.stderr
    assert "OSError: http://***@127.0.0.1:5000" in proc.stderr  # the thread's
    assert "ConnectionError: http://***@127.0.0.1:5000/api" in proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr


def test_scrubbed_errors_prints_a_traceback_and_one_line(capsys):
    with pytest.raises(SystemExit) as exited, secrets.scrubbed_errors():
        try:
            raise OSError(f"connect to {URL}")
        except OSError as cause:
            raise RuntimeError(f"tracking failed at {URL}") from cause
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert "CANARY" not in err
    assert "OSError: connect to http://***@127.0.0.1:5000" in err  # the chain, scrubbed
    last = err.rstrip().splitlines()[-1]
    assert last == "error: RuntimeError: tracking failed at http://***@127.0.0.1:5000"


def test_scrubbed_streams_catch_a_secret_split_across_writes(capsys):
    with secrets.scrubbed_streams():
        sys.stdout.write("View run at http://lladav:CANARY-pw")
        sys.stdout.write("-0123456789@127.0.0.1:5000/#/runs/1\n")
        sys.stdout.write(f"progress {URL}")  # no newline: passed on at the flush
        sys.stdout.flush()
        print(f"and {URL}", file=sys.stderr)
    out, err = capsys.readouterr()
    assert "CANARY" not in out + err
    assert out == "View run at http://***@127.0.0.1:5000/#/runs/1\nprogress http://***@127.0.0.1:5000"
    assert err == "and http://***@127.0.0.1:5000\n"


def test_the_workers_step_hook_logs_a_dead_server_scrubbed(installed, caplog, monkeypatch):
    from lladav.lineage import StepMetrics

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hook = StepMetrics(f"http://lladav:CANARY-pw-0123456789@127.0.0.1:{port}", "0" * 32)
    with caplog.at_level(logging.WARNING, logger="lladav.lineage"):
        hook(3, 0, {"loss": 1.5, "total_steps": 3})  # the last step: returns once sent
    assert "could not log step 3" in caplog.text and f"http://***@127.0.0.1:{port}" in caplog.text
    assert "CANARY" not in caplog.text
