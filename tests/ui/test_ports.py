"""`npd ui`'s ports, without a browser or a server: the UI is told its own API's URL, and a port
that is taken is one `error:` line before anything starts."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
from resume_checks import NPD, REPO

from npd_core.errors import NPDError
from npd_core.servers import check_ports, commands, prefect_api_url


def test_prefect_ui_is_told_its_own_api_url_and_the_printed_one_is_the_same(tmp_path):
    prefect, mlflow = commands(tmp_path, 4311, 5311)
    assert prefect.env == {"PREFECT_UI_API_URL": "http://127.0.0.1:4311/api"}
    assert prefect_api_url(4311) == prefect.env["PREFECT_UI_API_URL"]
    assert prefect.argv[-4:] == ["--host", "127.0.0.1", "--port", "4311"]
    assert (prefect.url, mlflow.url) == ("http://127.0.0.1:4311", "http://127.0.0.1:5311")
    assert mlflow.argv[mlflow.argv.index("--port") + 1] == "5311"
    assert mlflow.env == {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@pytest.mark.parametrize("taken", ["--port", "--mlflow-port"])
def test_a_port_in_use_is_one_error_line_naming_it_and_its_option_before_any_start(tmp_path, taken):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        with socket.socket() as other:
            other.bind(("127.0.0.1", 0))  # a port free for the other service
            free = other.getsockname()[1]
        ports = {"--port": free, "--mlflow-port": free}
        ports[taken] = busy
        res = subprocess.run(
            [*NPD, "ui", "--out", str(tmp_path / "out")]
            + [x for flag, port in ports.items() for x in (flag, str(port))],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "PREFECT_HOME": str(tmp_path / "home")},
            timeout=120,
        )
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1, res.stderr
    assert lines[0].startswith(f"error: port {busy} on 127.0.0.1 is in use"), lines[0]
    assert f"`npd ui {taken} PORT`" in lines[0]
    assert not (tmp_path / "out" / "logs").exists()  # no service was started
    assert not (tmp_path / "home").exists()


def test_the_same_port_for_both_names_both_options():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(NPDError, match=f"--port and --mlflow-port are both {port}"):
        check_ports(commands(Path("out"), port, port))
