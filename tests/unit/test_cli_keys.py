"""`hedgerow keys create|list|disable|delete` against the SQLite store a temporary config names."""

from __future__ import annotations

import asyncio
import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.store.base import KeyRecord
from proxy.store.sqlite import SQLiteStore

CONFIG = """\
server: {{host: 127.0.0.1, port: 8080}}
keys: [{{name: admin, key: sk-admin-0123456789, admin: true}}]
providers: [{{name: demo, base-url: "builtin:demo"}}]
models: [{{name: hedgerow/demo, endpoints: [{{provider: demo, model: demo}}]}}]
accounting:
  store: {{kind: sqlite, path: "{db}"}}
  orgs: [{{id: org_acme, name: Acme, credits: 10}}]
"""


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "hedgerow.yaml"
    path.write_text(CONFIG.format(db=tmp_path / "keys.db"))
    return str(path)


def _stored(config: str, key_id: str) -> KeyRecord | None:
    async def get() -> KeyRecord | None:
        store = SQLiteStore(str(Path(config).parent / "keys.db"))
        await store.open()
        try:
            return await store.get_key(key_id)
        finally:
            await store.close()

    return asyncio.run(get())


def _create(config: str, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[str, str]:
    assert main(["keys", "create", "--config", config, *args]) == 0
    out = capsys.readouterr().out
    key_id = re.search(r"^id:\s+(key_[0-9a-f]{16})$", out, re.M)
    secret = re.search(r"^key:\s+(sk-hr-\S{48})$", out, re.M)
    assert key_id and secret, out
    assert "will not be shown again" in out
    return key_id.group(1), secret.group(1)


def test_create_list_disable_delete(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    key_id, secret = _create(
        config, capsys, "--label", "ci-bot", "--limit", "2.5", "--limit-reset", "daily", "--rpm", "30",
        "--tpm", "5000", "--model", "hedgerow/demo", "--model", "openai/gpt-4o",
    )  # fmt: skip
    stored = _stored(config, key_id)
    assert stored is not None
    assert stored.digest == hashlib.sha256(secret.encode()).hexdigest()  # the secret authenticates
    assert (stored.label, stored.org, stored.limit, stored.limit_reset) == ("ci-bot", "org_default", 2.5, "daily")
    assert (stored.rpm, stored.tpm, stored.allowed_models) == (30, 5000, ["hedgerow/demo", "openai/gpt-4o"])

    assert main(["keys", "list", "--config", config]) == 0
    out = capsys.readouterr().out
    header, row = out.splitlines()
    assert header.split() == ["ID", "LABEL", "ORG", "DISABLED", "LIMIT", "USAGE"]
    assert row.split() == [key_id, "ci-bot", "org_default", "no", "2.50/daily", "0.000000"]
    assert secret not in out and stored.digest not in out

    assert main(["keys", "disable", "--config", config, key_id]) == 0
    assert key_id in capsys.readouterr().out
    disabled = _stored(config, key_id)
    assert disabled is not None and disabled.disabled and disabled.digest == stored.digest
    assert main(["keys", "list", "--config", config]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[3] == "yes"

    assert main(["keys", "delete", "--config", config, key_id]) == 0
    capsys.readouterr()
    assert _stored(config, key_id) is None
    assert main(["keys", "list", "--config", config]) == 0
    assert capsys.readouterr().out == "no keys\n"


def test_list_filters_by_org_and_configured_orgs_exist(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    acme, _ = _create(config, capsys, "--label", "a", "--org", "org_acme")
    _create(config, capsys, "--label", "b")
    assert main(["keys", "list", "--config", config, "--org", "org_acme"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [r.split()[0] for r in rows] == [acme]


@pytest.mark.parametrize("action", ["disable", "delete"])
def test_unknown_id_fails_with_a_message(config: str, capsys: pytest.CaptureFixture[str], action: str) -> None:
    assert main(["keys", action, "--config", config, "key_ffffffffffffffff"]) == 1
    assert "no key with id 'key_ffffffffffffffff'" in capsys.readouterr().err


def test_invalid_values_and_unknown_org_fail_with_a_message(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "create", "--config", config, "--label", "x", "--limit", "-1"]) == 1
    assert "limit" in capsys.readouterr().err
    assert main(["keys", "create", "--config", config, "--label", "x", "--org", "org_nowhere"]) == 1
    assert "org_nowhere" in capsys.readouterr().err
    assert main(["keys", "list", "--config", config]) == 0
    assert capsys.readouterr().out == "no keys\n"  # nothing was created


def test_unreachable_store_fails_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(CONFIG.format(db=tmp_path / "missing-dir" / "keys.db"))
    assert main(["keys", "list", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "unreachable" in err and "Traceback" not in err


def test_runs_as_a_module(config: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "keys", "create", "--config", config, "--label", "sub"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"^key:\s+sk-hr-\S{48}$", done.stdout, re.M)
