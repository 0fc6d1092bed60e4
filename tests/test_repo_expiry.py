"""Metadata that does not expire by surprise: configurable periods kept with the repository,
refresh units written by `repo init` (checked by systemd-analyze where present), and
`repo show` warnings before and after expiry."""

from __future__ import annotations

import json
import subprocess
from datetime import timedelta

from click.testing import CliRunner
from support.programs import require_program
from tuf.api.metadata import Metadata

from edgepack.cli.main import cli
from edgepack.ota.refresh import SERVICE, TIMER, refresh_every_hours
from edgepack.ota.repo import Expiry, Repository


def invoke(*args, code=0):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == code, (r.exit_code, r.output)
    return r


def test_init_writes_and_prints_refresh_units_and_keeps_periods(tmp_path):
    d = tmp_path / "repo"
    out = invoke("repo", "init", d, "--timestamp-days", "1", "--snapshot-days", "7").output
    assert "re-sign it with `edgepack repo refresh` from a timer" in out
    assert f"systemctl enable --now {TIMER}" in out
    assert "0 */6 * * * " in out and f"repo refresh {d.resolve()}" in out
    service = (d / "systemd" / SERVICE).read_text()
    timer = (d / "systemd" / TIMER).read_text()
    assert "Type=oneshot" in service and f"repo refresh {d.resolve()}" in service
    assert "OnCalendar=*-*-* 00/6:00:00" in timer and "Persistent=true" in timer
    assert json.loads((d / "expiry.json").read_text()) == {
        "snapshot_days": 7.0, "targets_days": 90.0, "timestamp_days": 1.0}
    # Later signing uses the stored periods, not the defaults.
    invoke("repo", "refresh", d)
    ts = Metadata.from_file(str(d / "public" / "metadata" / "timestamp.json"))
    left = ts.signed.expires - ts.signed.expires.now(ts.signed.expires.tzinfo)
    assert timedelta(hours=23) < left <= timedelta(days=1)


def test_refresh_units_pass_systemd_analyze_verify(tmp_path):
    analyze = require_program("systemd-analyze")
    d = tmp_path / "repo"
    invoke("repo", "init", d)
    units = d / "systemd"
    r = subprocess.run([analyze, "verify", str(units / SERVICE), str(units / TIMER)],
                       capture_output=True, text=True)
    # verify also reports the ExecStart binary when it is not installed system-wide; any
    # message about the units' own syntax fails the test.
    problems = [ln for ln in r.stderr.splitlines()
                if "edgepack-repo-refresh" in ln and "is not executable" not in ln
                and "No such file" not in ln]
    assert not problems, r.stderr


def test_refresh_period_follows_the_timestamp_period():
    assert refresh_every_hours(timedelta(days=2)) == 12
    assert refresh_every_hours(timedelta(days=1)) == 6
    assert refresh_every_hours(timedelta(hours=3)) == 1
    assert refresh_every_hours(timedelta(days=30)) == 24


def test_bad_expiry_periods_are_usage_errors(tmp_path):
    r = invoke("repo", "init", tmp_path / "r", "--timestamp-days", "0", code=2)
    assert "--timestamp-days 0 must be positive" in r.output
    r = invoke("repo", "init", tmp_path / "r2", "--timestamp-days", "40", code=2)
    assert "timestamp" in r.output and "do not hold" in r.output
    assert not (tmp_path / "r").exists() and not (tmp_path / "r2").exists()


def test_show_warns_when_expiry_is_near_or_passed(tmp_path):
    d = tmp_path / "repo"
    invoke("repo", "init", d)
    r = CliRunner().invoke(cli, ["repo", "show", str(d)])
    assert r.exit_code == 0 and "warning" not in r.output  # fresh: 2 days left
    rep = Repository(d)
    rep.refresh(Expiry(timestamp=timedelta(hours=5)))
    r = CliRunner().invoke(cli, ["repo", "show", str(d)])
    assert r.exit_code == 0
    assert "warning: timestamp metadata expires in 5.0 h" in r.output
    assert f"edgepack repo refresh {d}" in r.output
    rep.refresh(Expiry(timestamp=-timedelta(hours=3)))
    r = CliRunner().invoke(cli, ["repo", "show", str(d), "--expiry", "--json"])
    assert "warning: timestamp metadata expired 3.0 h ago" in r.output
    roles = json.loads(r.output[:r.output.index("warning")])
    assert [e["role"] for e in roles] == ["timestamp", "snapshot", "targets", "root"]
    assert roles[0]["expired"] and not roles[1]["near"]
