"""Listeners beyond loopback: the config refuses them without a token, `serve` says so in one
line, and the metrics listener warns, checks the token and Host, and caps its connections."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_viewer_limits import TOKEN, get, wait_for

from pn2v_live.errors import UserError
from pn2v_live.service.config import load_config
from pn2v_live.service.metrics_server import MAX_CONNECTIONS, start_metrics_server


@pytest.mark.parametrize(
    "settings, message",
    [
        (['viewer.bind="0.0.0.0:8080"'], "viewer.token: required because viewer.bind 0.0.0.0"),
        (['viewer.bind="[::]:8080"'], "viewer.token: required because viewer.bind [::]:8080"),
        (['metrics.bind="[::]:9464"'], "metrics.token: required because metrics.bind [::]"),
        (['viewer.bind="0.0.0.0:8080"', 'viewer.token="abc"'], "viewer.token: too short"),
        (['viewer.token="has spaces in it, many"'], "viewer.token: use printable ASCII"),
        (['viewer.bind="127.0.0.1:８０８０"'], "viewer.bind: expected host:port"),
        (["viewer.max_streams=64", "viewer.max_connections=64"], "viewer.max_connections: must"),
        (["viewer.max_streams=0"], "viewer.max_streams"),
        (['viewer.allowed_hosts=["a b"]'], "viewer.allowed_hosts"),
    ],
)
def test_config_refuses_open_listeners_without_a_token(settings, message) -> None:
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, settings)


def test_config_accepts_loopback_without_and_any_bind_with_a_token() -> None:
    assert load_config(None, []).viewer.token == ""
    assert load_config(None, ['viewer.bind="localhost:8080"']).viewer.token == ""
    config = load_config(
        None,
        [
            'viewer.bind="0.0.0.0:8080"',
            f'viewer.token="{TOKEN}"',
            'viewer.allowed_hosts=["scope-pc.lab.example.org"]',
            'metrics.bind="0.0.0.0:9464"',
            f'metrics.token="{TOKEN}"',
        ],
    )
    assert config.viewer.token == config.metrics.token == TOKEN
    assert (config.viewer.max_streams, config.viewer.max_connections) == (64, 256)


def test_metrics_beyond_loopback_warn_and_need_the_token(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="pn2v_live.service.metrics_server"):
        server = start_metrics_server("0.0.0.0", 0, TOKEN)
    port = server.server_port
    try:
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("metrics listens beyond loopback on 0.0.0.0" in w for w in warnings), warnings
        status, headers, body = get(port, "/metrics")
        assert status == 401 and b"pn2v_live" not in body
        assert headers["WWW-Authenticate"].startswith("Bearer")
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        status, _, body = get(port, "/metrics", bearer)
        assert status == 200 and b"pn2v_live_" in body
        assert get(port, "/metrics", {**bearer, "Host": "attacker.example"})[0] == 421
        # Idle connections cannot pile up: past MAX_CONNECTIONS new ones get 503.
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_CONNECTIONS)]
        time.sleep(0.2)
        assert get(port, "/metrics", bearer)[0] == 503
        for client in idle:
            client.close()
        wait_for(lambda: get(port, "/metrics", bearer)[0] == 200, what="a free metrics slot")
    finally:
        server.shutdown()
        server.server_close()


def test_serve_refuses_a_listener_beyond_loopback_without_a_token(tmp_path: Path) -> None:
    """One `error:` line naming the key and why, exit code 2, before anything starts."""
    config = tmp_path / "serve.toml"
    config.write_text('[viewer]\nbind = "0.0.0.0:8080"\n')
    cli = Path(sys.executable).with_name("pn2v-live")
    result = subprocess.run(
        [cli, "serve", "--config", config], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [error] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert "viewer.token: required because viewer.bind 0.0.0.0:8080 listens beyond" in error


def test_daemon_passes_the_viewer_and_metrics_settings(tmp_path: Path) -> None:
    """The daemon's own listeners follow [viewer] and [metrics]: tokens, caps and names."""
    from pn2v_live.core.noise import PoissonGaussianNoiseModel
    from pn2v_live.service.daemon import Daemon
    from pn2v_live.service.notify import SystemdNotifier
    from pn2v_live.storage.noise_model_file import save_noise_model

    model = PoissonGaussianNoiseModel(gain=1.0, offset=0.0, read_noise=2.0, signal_range=(0, 255))
    save_noise_model(model, tmp_path / "nm.pt")
    config = load_config(
        None,
        [
            f'store.root="{tmp_path / "store"}"',
            f'noise_model.path="{tmp_path / "nm.pt"}"',
            'ingest.zmq.bind=""',
            'publish.bind=""',
            'viewer.bind="127.0.0.1:0"',
            f'viewer.token="{TOKEN}"',
            'viewer.allowed_hosts=["scope-pc.lab.example.org"]',
            "viewer.max_streams=3",
            "viewer.max_connections=9",
            'metrics.bind="127.0.0.1:0"',
            f'metrics.token="{TOKEN}"',
        ],
    )
    daemon = Daemon(config, SystemdNotifier(environ={}))
    daemon._stop.install = lambda: None  # leave pytest's signal handlers alone
    daemon.start()
    try:
        viewer = daemon.viewer
        assert (viewer.token, viewer.max_streams, viewer.max_connections) == (TOKEN, 3, 9)
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert get(viewer.port, "/api/status")[0] == 401
        assert get(viewer.port, "/api/status", bearer)[0] == 200
        named = {**bearer, "Host": "scope-pc.lab.example.org"}
        assert get(viewer.port, "/api/status", named)[0] == 200
        metrics_port = int(daemon.addresses["metrics"].rsplit(":", 1)[1].split("/")[0])
        assert get(metrics_port, "/metrics")[0] == 401
        assert get(metrics_port, "/metrics", bearer)[0] == 200
    finally:
        daemon.close()
