"""CPU feature detection (nezha_zoo.hardware): parsing fixtures of /proc/cpuinfo and macOS sysctl."""

from __future__ import annotations

import dataclasses
import json

import pytest

from nezha_zoo import hardware
from nezha_zoo.hardware import CpuFeatures, cpu_features, machine_info, parse_cpuinfo, parse_sysctl

# Two processors of an AVX-512 VNNI/BF16 machine (only the first is read), trimmed.
EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512dq avx512_bf16 avx512vl avx512_vnni avx512_bitalg
bugs\t\t: sysret_ss_attrs

processor\t: 1
model name\t: ignored
flags\t\t: fpu amx_tile amx_int8
"""

SAPPHIRE_RAPIDS = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: avx2 avx_vnni avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""

HASWELL = """processor\t: 0
model name\t: Intel(R) Xeon(R) CPU E5-2680 v3 @ 2.50GHz
flags\t\t: fpu sse4_2 avx avx2 fma
"""

ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics bf16 i8mm
CPU implementer\t: 0x41
"""

MAC_X86 = """machdep.cpu.brand_string: Intel(R) Core(TM) i9-10910 CPU @ 3.60GHz
machdep.cpu.features: FPU VME SSE SSE2 AVX1.0
machdep.cpu.leaf7_features: SMEP ERMS AVX2 AVX512F AVX512VNNI BMI2
"""


def test_cpuinfo_vnni_bf16_first_processor_only():
    f = parse_cpuinfo(EPYC)
    assert f.model == "AMD EPYC 9R14"
    assert f.flags() == ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"]
    assert f.int8_dot and f.bf16_dot
    assert not (f.amx_tile or f.amx_int8 or f.avx_vnni)  # the second processor's line is not read


def test_cpuinfo_amx():
    f = parse_cpuinfo(SAPPHIRE_RAPIDS)
    assert f.flags() == [
        "avx2",
        "avx512f",
        "avx512_vnni",
        "avx_vnni",
        "avx512_bf16",
        "amx_tile",
        "amx_int8",
        "amx_bf16",
    ]


def test_cpuinfo_avx2_only():
    f = parse_cpuinfo(HASWELL)
    assert f.flags() == ["avx2"]
    assert not f.int8_dot and not f.bf16_dot
    assert f.summary() == "Intel(R) Xeon(R) CPU E5-2680 v3 @ 2.50GHz (avx2)"


def test_cpuinfo_without_x86_flags():
    # aarch64 spells its bf16 / i8mm units differently: none of the x86 flags is claimed
    f = parse_cpuinfo(ARM)
    assert f.model == "unknown" and f.flags() == []
    assert parse_cpuinfo("") == CpuFeatures()
    assert "none of avx2" in CpuFeatures(model="x").summary()


def test_sysctl():
    f = parse_sysctl(MAC_X86)
    assert f.model == "Intel(R) Core(TM) i9-10910 CPU @ 3.60GHz"
    assert f.flags() == ["avx2", "avx512f", "avx512_vnni"]
    assert parse_sysctl("machdep.cpu.brand_string: Apple M2\n").flags() == []


def test_frozen_and_json_ready():
    f = parse_cpuinfo(EPYC)
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.avx2 = False
    d = json.loads(json.dumps(f.as_dict()))
    assert CpuFeatures(**d) == f


def test_this_machine(monkeypatch):
    f = cpu_features()
    assert isinstance(f, CpuFeatures) and f.model
    assert cpu_features() is f  # read once
    info = machine_info(3)
    assert info["threads"] == 3 and info["cpu"] == f.model
    assert info["cpu_flags"] == f.flags() and info["cpu_features"] == f.as_dict()


def test_unreadable_cpuinfo_is_all_false(monkeypatch):
    def boom(*a, **k):
        raise OSError("no /proc")

    monkeypatch.setattr(hardware.platform, "system", lambda: "Linux")
    monkeypatch.setattr("builtins.open", boom)
    hardware.cpu_features.cache_clear()
    try:
        f = hardware.cpu_features()
        assert f.flags() == [] and f.model  # model falls back to platform's name
    finally:
        monkeypatch.undo()
        hardware.cpu_features.cache_clear()


def test_int8_products_policy(monkeypatch):
    # I-BERT's quant mode uses int8 units: forced by set_int8_products, else the env switch, else the CPU
    from nezha_zoo.families import ibert

    monkeypatch.delenv(ibert.INT8_PRODUCTS_ENV, raising=False)
    assert ibert.int8_products() == cpu_features().int8_dot
    monkeypatch.setenv(ibert.INT8_PRODUCTS_ENV, "0")
    assert ibert.int8_products() is False
    monkeypatch.setenv(ibert.INT8_PRODUCTS_ENV, "1")
    assert ibert.int8_products() is True
    previous = ibert.set_int8_products(False)
    try:
        assert previous is None and ibert.int8_products() is False
    finally:
        ibert.set_int8_products(previous)
    monkeypatch.setenv(ibert.INT8_PRODUCTS_ENV, "yes")
    with pytest.raises(ValueError, match=ibert.INT8_PRODUCTS_ENV):
        ibert.int8_products()
    with pytest.raises(TypeError):
        ibert.set_int8_products(1)


def test_int8_ranges_are_proved_by_the_bit_widths():
    from nezha_zoo.families import ibert

    act = 2 ** (ibert.ACT_BIT - 1)  # QuantAct output: [-act, act - 1]
    weight = 2 ** (ibert.WEIGHT_BIT - 1) - 1  # weights: [-weight, weight - 1]
    assert ibert.INT8_MIN <= -act and act - 1 <= ibert.INT8_MAX and -weight >= ibert.INT8_MIN
    assert 128 * 128 * ibert.INT32_EXACT_TERMS <= 2**31 - 1 < 128 * 128 * (ibert.INT32_EXACT_TERMS + 1)
