"""CRC-16/X-25 and CRC-16/ARC: catalogue check values, vendor examples, and crcmod's C extension."""

from __future__ import annotations

import importlib

from trackcodecs.crc import crc16_arc, crc16_x25


def test_crcmod_c_extension_is_in_use() -> None:
    assert importlib.import_module("crcmod.crcmod")._usingExtension is True


def test_catalogue_check_values() -> None:
    assert crc16_x25(b"123456789") == 0x906E
    assert crc16_arc(b"123456789") == 0xBB3D


def test_gt06_vendor_examples() -> None:
    # Concox GT06 protocol 5.1.3: login and its reply.
    assert crc16_x25(bytes.fromhex("0d01012345678901234500 01".replace(" ", ""))) == 0x8CDD
    assert crc16_x25(bytes.fromhex("05010001")) == 0xD9DC
    assert crc16_x25(bytes.fromhex("05130011")) == 0xF970


def test_teltonika_vendor_example() -> None:
    field = bytes.fromhex(
        "08010000016b40d8ea30010000000000000000000000000000000105021503010101425e0f01f10000601a014e000000000000000001"
    )
    assert crc16_arc(field) == 0xC7CF
