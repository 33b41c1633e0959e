"""``fleetgate devices``: add, list, remove and import against a SQLite file, through the installed command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).with_name("fleetgate")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "fleetgate"]

IMEI_A, IMEI_B, IMEI_C = "356307042441013", "356307042441021", "869000000000001"


class Cli:
    """Runs ``fleetgate devices`` in ``tmp_path`` against ``tmp_path/state.sqlite``, without outside FLEETGATE_*."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.db = directory / "state.sqlite"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETGATE_")}

    def __call__(
        self, *args: str, env: dict[str, str] | None = None, db: bool = True, stdin: str = ""
    ) -> subprocess.CompletedProcess[str]:
        argv = [*COMMAND, "devices", *args, *(["--sqlite-path", str(self.db)] if db else [])]
        env = {**self.env, **(env or {})}
        return subprocess.run(
            argv, input=stdin, capture_output=True, text=True, cwd=self.directory, env=env, timeout=60
        )

    def devices(self) -> list[dict[str, object]]:
        proc = self("list", "--json")
        assert proc.returncode == 0, proc.stderr
        result: list[dict[str, object]] = json.loads(proc.stdout)
        return result

    def imeis(self) -> list[object]:
        return [d["imei"] for d in self.devices()]

    def write(self, name: str, text: str) -> str:
        (self.directory / name).write_text(text)
        return name


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


def test_add_list_remove(cli: Cli) -> None:
    proc = cli("add", IMEI_A, "--asset", "truck-7", "--company", "acme", "--name", "Truck 7", "--speed-limit", "80")
    assert proc.returncode == 0, proc.stderr
    assert "added" in proc.stdout
    assert cli("add", IMEI_B, "--asset", "van-1", "--company", "globex", "--protocol", "teltonika").returncode == 0
    assert cli.devices() == [
        {
            "imei": IMEI_A,
            "asset_id": "truck-7",
            "company_id": "acme",
            "display_name": "Truck 7",
            "speed_limit_kmh": 80.0,
            "protocol": None,
        },
        {
            "imei": IMEI_B,
            "asset_id": "van-1",
            "company_id": "globex",
            "display_name": "",
            "speed_limit_kmh": None,
            "protocol": "teltonika",
        },
    ]
    table = cli("list", "--company", "acme").stdout.splitlines()
    assert table[0].split() == ["IMEI", "ASSET", "COMPANY", "PROTOCOL", "LIMIT", "KMH", "NAME"]
    assert table[1].split() == [IMEI_A, "truck-7", "acme", "any", "80", "Truck", "7"]
    assert len(table) == 2

    proc = cli("add", IMEI_A, "--asset", "truck-8", "--company", "acme")
    assert proc.returncode == 0 and "updated" in proc.stdout
    assert cli.devices()[0]["asset_id"] == "truck-8"

    proc = cli("remove", IMEI_A)
    assert proc.returncode == 0, proc.stderr
    assert cli.imeis() == [IMEI_B]
    proc = cli("remove", IMEI_A)
    assert proc.returncode == 1 and IMEI_A in proc.stderr


def test_empty_list(cli: Cli) -> None:
    assert cli.devices() == []
    assert cli("list").stdout.strip() == "(no devices)"


@pytest.mark.parametrize("imei", ["35630704244101", "3563070424410130", "35630704244101x", " "])
def test_add_rejects_bad_imei(cli: Cli, imei: str) -> None:
    proc = cli("add", imei, "--asset", "a", "--company", "c")
    assert proc.returncode == 2
    assert "15 digits" in proc.stderr or "missing" in proc.stderr
    assert cli.devices() == []


def test_add_rejects_bad_speed_limit(cli: Cli) -> None:
    proc = cli("add", IMEI_A, "--asset", "a", "--company", "c", "--speed-limit", "-5")
    assert proc.returncode == 2 and "speed_limit_kmh" in proc.stderr
    assert cli.devices() == []


def test_import_csv(cli: Cli) -> None:
    name = cli.write(
        "fleet.csv",
        "imei,asset_id,company_id,display_name,speed_limit_kmh,protocol\n"
        f"{IMEI_B},van-1,globex,,,\n"
        f'{IMEI_A},truck-7,acme,"Truck 7, the old one",90,gt06\n'
        "\n"
        f"{IMEI_C},truck-9,acme\n",  # trailing optional cells missing
    )
    proc = cli("import", name)
    assert proc.returncode == 0, proc.stderr
    assert "3 devices: 3 added, 0 updated, 0 unchanged" in proc.stdout
    devices = {d["imei"]: d for d in cli.devices()}
    assert list(devices) == [IMEI_A, IMEI_B, IMEI_C]
    assert devices[IMEI_A]["display_name"] == "Truck 7, the old one"
    assert devices[IMEI_A]["speed_limit_kmh"] == 90.0 and devices[IMEI_A]["protocol"] == "gt06"
    assert devices[IMEI_B]["speed_limit_kmh"] is None and devices[IMEI_B]["protocol"] is None
    assert devices[IMEI_C]["display_name"] == ""


def test_import_csv_with_only_the_required_columns(cli: Cli) -> None:
    name = cli.write("fleet.csv", f"asset_id,imei,company_id\r\nvan-1,{IMEI_B},globex\r\n")
    assert cli("import", name).returncode == 0
    assert cli.devices() == [
        {
            "imei": IMEI_B,
            "asset_id": "van-1",
            "company_id": "globex",
            "display_name": "",
            "speed_limit_kmh": None,
            "protocol": None,
        }
    ]


def test_import_json_and_reimport_counts(cli: Cli) -> None:
    rows = [
        {"imei": IMEI_A, "asset_id": "truck-7", "company_id": "acme", "speed_limit_kmh": 80},
        {"imei": IMEI_B, "asset_id": "van-1", "company_id": "globex", "protocol": "mqtt", "display_name": None},
    ]
    name = cli.write("fleet.json", json.dumps(rows, indent=2))
    proc = cli("import", name)
    assert proc.returncode == 0, proc.stderr
    assert "2 devices: 2 added, 0 updated, 0 unchanged" in proc.stdout
    assert cli.imeis() == [IMEI_A, IMEI_B]

    rows[0]["asset_id"] = "truck-8"
    rows.append({"imei": IMEI_C, "asset_id": "truck-9", "company_id": "acme"})
    proc = cli("import", cli.write("fleet.json", json.dumps(rows)))
    assert "3 devices: 1 added, 1 updated, 1 unchanged" in proc.stdout
    assert cli.devices()[0]["asset_id"] == "truck-8"


def test_list_json_imports_back(cli: Cli, tmp_path: Path) -> None:
    cli("add", IMEI_A, "--asset", "truck-7", "--company", "acme", "--name", "Truck 7", "--speed-limit", "80.5")
    cli("add", IMEI_B, "--asset", "van-1", "--company", "globex", "--protocol", "gt06")
    exported = cli("list", "--json").stdout
    other = Cli(tmp_path / "other")
    other.directory.mkdir()
    proc = other("import", "-", stdin=exported)
    assert proc.returncode == 0, proc.stderr
    assert other.devices() == cli.devices()


def test_format_decided_by_content_without_extension(cli: Cli) -> None:
    as_json = cli.write("fleet.txt", json.dumps([{"imei": IMEI_A, "asset_id": "a", "company_id": "c"}]))
    as_csv = cli.write("fleet.dat", f"imei,asset_id,company_id\n{IMEI_B},b,c\n")
    assert cli("import", as_json).returncode == 0
    assert cli("import", as_csv).returncode == 0
    assert cli.imeis() == [IMEI_A, IMEI_B]


# -- bad files: the first bad row's line, nothing imported -------------------------------------

HEADER = "imei,asset_id,company_id,display_name,speed_limit_kmh,protocol\n"
GOOD_ROWS = f"{IMEI_A},truck-7,acme,,,\n{IMEI_B},van-1,acme,,,\n"


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (HEADER + GOOD_ROWS + "35630704244101,x,acme,,,\n", 4, "15 digits"),
        (HEADER + GOOD_ROWS + f"{IMEI_C},,acme,,,\n", 4, "asset_id is missing"),
        (HEADER + GOOD_ROWS + f"{IMEI_C},x,acme,,fast,\n", 4, "not a number"),
        (HEADER + GOOD_ROWS + f"{IMEI_C},x,acme,,0,\n", 4, "positive"),
        (HEADER + GOOD_ROWS + f"{IMEI_C},x,acme,,,tk103\n", 4, "protocol"),
        (HEADER + GOOD_ROWS + f"{IMEI_C},x,acme,,,,extra\n", 4, "7 cells"),
        (HEADER + GOOD_ROWS + f"{IMEI_A},again,acme,,,\n", 4, "already on line 2"),
        (HEADER + f'{IMEI_C},x,acme,"two\nlines",,\n' + "bad,x,acme,,,\n" + GOOD_ROWS, 4, "15 digits"),
        (HEADER + "\n\n" + f"{IMEI_C},x,acme,,,mqtt\n" + "12,x,acme\n" + GOOD_ROWS, 5, "15 digits"),
        ("imei,asset,company_id\n" + f"{IMEI_C},x,acme\n", 1, "unknown column 'asset'"),
        ("imei,asset_id\n" + f"{IMEI_C},x\n", 1, "missing column 'company_id'"),
        ("", 1, "header"),
    ],
)
def test_bad_csv_row_rejected_with_line(cli: Cli, text: str, line: int, message: str) -> None:
    cli("add", IMEI_C, "--asset", "before", "--company", "acme")
    proc = cli("import", cli.write("fleet.csv", text))
    assert proc.returncode == 1
    assert f"line {line}:" in proc.stderr and message in proc.stderr, proc.stderr
    assert "nothing imported" in proc.stderr
    assert cli.devices() == [
        {
            "imei": IMEI_C,
            "asset_id": "before",
            "company_id": "acme",
            "display_name": "",
            "speed_limit_kmh": None,
            "protocol": None,
        }
    ]


def _json_rows(*rows: dict[str, object]) -> str:
    return "[\n" + ",\n".join("  " + json.dumps(row) for row in rows) + "\n]\n"


GOOD_A = {"imei": IMEI_A, "asset_id": "truck-7", "company_id": "acme"}
GOOD_B = {"imei": IMEI_B, "asset_id": "van-1", "company_id": "acme"}


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (_json_rows(GOOD_A, GOOD_B, {**GOOD_A, "imei": "1234"}), 4, "15 digits"),
        (_json_rows(GOOD_A, {**GOOD_B, "imei": 356307042441021}), 3, "imei must be a string"),
        (_json_rows(GOOD_A, {**GOOD_B, "speed_limit_kmh": True}), 3, "must be a number"),
        (_json_rows(GOOD_A, {**GOOD_B, "asset": "x"}), 3, "unknown key 'asset'"),
        (_json_rows(GOOD_A, {"imei": IMEI_B, "asset_id": "x"}), 3, "company_id is missing"),
        (_json_rows(GOOD_A, GOOD_B, GOOD_A), 4, "already on line 2"),
        (json.dumps([GOOD_A, GOOD_B, {**GOOD_B, "imei": "x"}], indent=2), 12, "15 digits"),
        ("[\n" + json.dumps(GOOD_A) + ",\n" + '  ["not", "an object"]\n]', 3, "expected an object"),
        ("[\n" + json.dumps(GOOD_A) + ",\n" + "  {'imei': 1}\n]", 3, "not valid JSON"),
        ("[\n" + json.dumps(GOOD_A) + "\n" + json.dumps(GOOD_B) + "\n]", 3, "expected ','"),
        ("[\n" + json.dumps(GOOD_A) + ",\n]", 3, "not valid JSON"),
        ('{"imei": "1"}', 1, "expected a JSON list"),
        ("[]\n[]", 2, "after the end"),
    ],
)
def test_bad_json_row_rejected_with_line(cli: Cli, text: str, line: int, message: str) -> None:
    proc = cli("import", cli.write("fleet.json", text))
    assert proc.returncode == 1
    assert f"line {line}:" in proc.stderr and message in proc.stderr, proc.stderr
    assert cli.devices() == []


def test_missing_import_file(cli: Cli) -> None:
    proc = cli("import", "nowhere.csv")
    assert proc.returncode == 1 and "nowhere.csv" in proc.stderr


# -- where the store is: options, environment, configuration file ------------------------------


def test_store_from_environment(cli: Cli) -> None:
    env = {"FLEETGATE_STATE__SQLITE_PATH": str(cli.directory / "from-env.sqlite")}
    assert cli("add", IMEI_A, "--asset", "a", "--company", "c", env=env, db=False).returncode == 0
    assert (cli.directory / "from-env.sqlite").exists()
    assert IMEI_A in cli("list", env=env, db=False).stdout
    assert cli.devices() == []  # --sqlite-path wins over the environment


def test_store_from_config_file(cli: Cli) -> None:
    config = cli.write(
        "fleetgate.toml", f'[state]\ndriver = "sqlite"\nsqlite_path = "{cli.directory / "cfg.sqlite"}"\n'
    )
    assert cli("add", IMEI_A, "--asset", "a", "--company", "c", "--config", config, db=False).returncode == 0
    assert (cli.directory / "cfg.sqlite").exists()


def test_bad_configuration(cli: Cli) -> None:
    proc = cli("list", env={"FLEETGATE_STATE__DRIVER": "postgres"})
    assert proc.returncode == 2 and "driver" in proc.stderr


def test_redis_store(cli: Cli, redis_url: str) -> None:
    redis = ["--state-driver", "redis", "--redis-url", redis_url]
    assert cli("add", IMEI_A, "--asset", "a", "--company", "c", *redis, db=False).returncode == 0
    assert IMEI_A in cli("list", *redis, db=False).stdout
    assert not cli.db.exists()
    assert cli("remove", IMEI_A, *redis, db=False).returncode == 0


def test_unreachable_redis(cli: Cli) -> None:
    proc = cli("list", "--state-driver", "redis", "--redis-url", "redis://127.0.0.1:1/0", db=False)
    assert proc.returncode == 1 and "state store" in proc.stderr
