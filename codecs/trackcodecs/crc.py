"""The two CRC-16 variants of the tracker protocols, computed by crcmod's C extension.

* CRC-16/X-25 (GT06, "CRC-ITU" in the Concox documents): poly 0x1021 reflected,
  init 0xFFFF, xorout 0xFFFF; check("123456789") = 0x906E.
* CRC-16/ARC (Teltonika, "CRC-16/IBM"): poly 0x8005 reflected, init 0,
  xorout 0; check("123456789") = 0xBB3D.
"""

from __future__ import annotations

from collections.abc import Callable

import crcmod

# crcmod takes the polynomial with its x^16 term; rev=True means reflected
# input and output, initCrc is the register value *before* the final XOR is
# undone, hence 0x0000 for X-25 (init 0xFFFF xor 0xFFFF).
crc16_x25: Callable[[bytes], int] = crcmod.mkCrcFun(0x11021, initCrc=0x0000, rev=True, xorOut=0xFFFF)
crc16_arc: Callable[[bytes], int] = crcmod.mkCrcFun(0x18005, initCrc=0x0000, rev=True, xorOut=0x0000)
