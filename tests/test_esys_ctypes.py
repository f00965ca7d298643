"""The boot path's ctypes bindings to libtss2 (qubes_seal.tpm.esys), and no tpm2-pytss at boot.

* every ctypes structure has the C compiler's size, alignment and field offsets (a tiny C
  program compiled against /usr/include/tss2), and tpm2-pytss's cffi agrees;
* PCR read/extend and the SRK's name give what tpm2-pytss's ESAPI gives, with the expected
  commands on the wire;
* ``python -m qubes_seal.boot`` never imports ``tpm2_pytss`` nor ``cryptography.x509``, on the
  success path and on a refused (tampered) boot whose diagnosis names PCR 17.
"""

from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_boot import Machine, new_machine, shut_down

from qubes_seal import chain
from qubes_seal.errors import TPMUnavailable
from qubes_seal.sim.proxy import CountingProxy
from qubes_seal.sim.swtpm import Swtpm
from qubes_seal.sim.txt_launch import sample_modules, txt_launch
from qubes_seal.tpm import esys
from qubes_seal.tpm.device import Tpm
from qubes_seal.tpm.esys import Esys

HEADER = Path("/usr/include/tss2/tss2_esys.h")
FORBIDDEN = ("tpm2_pytss", "cryptography.x509")
#: esys.py's copies of the headers' macros.
CONSTANTS = (
    "ESYS_TR_NONE", "ESYS_TR_PASSWORD", "ESYS_TR_PCR0", "TPM2_ALG_SHA1", "TPM2_ALG_AES",
    "TPM2_ALG_SHA256", "TPM2_ALG_SHA384", "TPM2_ALG_SHA512", "TPM2_ALG_NULL", "TPM2_ALG_CFB",
    "TPM2_SE_HMAC", "TPM2_SE_POLICY", "TPM2_CAP_HANDLES", "TPMA_SESSION_CONTINUESESSION",
    "TPMA_SESSION_DECRYPT", "TPMA_SESSION_ENCRYPT", "TPM2_NUM_PCR_BANKS", "TPM2_PCR_SELECT_MAX",
    "TPM2_MAX_CAP_HANDLES", "TPM2_MAX_SYM_DATA",
)  # fmt: skip


# -- ABI ------------------------------------------------------------------------------------------


def _layout() -> dict[str, tuple[int, int, dict[str, int]]]:
    """name -> (sizeof, alignment, {field: offset}) as ctypes lays the structures out."""
    out = {}
    for name, cls in esys.STRUCTS.items():
        offsets = {}
        if issubclass(cls, ctypes.Structure):
            offsets = {
                f[0]: getattr(cls, f[0]).offset for f in cls._fields_ if not f[0].startswith("_")
            }
        out[name] = (ctypes.sizeof(cls), ctypes.alignment(cls), offsets)
    return out


def test_structures_and_constants_match_the_c_headers(tmp_path: Path) -> None:
    if shutil.which("gcc") is None or not HEADER.exists():
        pytest.skip("gcc or libtss2-dev's headers (/usr/include/tss2) missing")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <tss2/tss2_esys.h>",
             "int main(void) {"]  # fmt: skip
    for name, (_, _, offsets) in _layout().items():
        lines.append(f'printf("{name} %zu %zu\\n", sizeof({name}), _Alignof({name}));')
        for field in offsets:
            lines.append(f'printf("{name}.{field} %zu\\n", offsetof({name}, {field}));')
    for const in CONSTANTS:
        lines.append(f'printf("{const} %llu\\n", (unsigned long long) ({const}));')
    lines += ["return 0;", "}"]
    src = tmp_path / "sizes.c"
    src.write_text("\n".join(lines) + "\n")
    exe = tmp_path / "sizes"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True, capture_output=True)
    output = subprocess.check_output([str(exe)], text=True)
    c = dict(line.split(" ", 1) for line in output.splitlines() if line)
    for name, (size, align, offsets) in _layout().items():
        assert c[name] == f"{size} {align}", name
        for field, off in offsets.items():
            assert c[f"{name}.{field}"] == str(off), f"{name}.{field}"
    for const in CONSTANTS:
        assert c[const] == str(getattr(esys, const)), const


def test_structures_match_tpm2_pytss_cffi() -> None:
    """tpm2-pytss's cffi module was compiled against the same headers: same ABI."""
    ffi = pytest.importorskip("tpm2_pytss._libtpm2_pytss").ffi
    for name, (size, align, offsets) in _layout().items():
        assert ffi.sizeof(name) == size, name
        assert ffi.alignof(name) == align, name
        for field, off in offsets.items():
            assert ffi.offsetof(name, field) == off, f"{name}.{field}"


def test_pcr_selection_bitmap() -> None:
    sel = esys.pcr_selection([0, 13, 17, 23], "sha256")
    assert sel.count == 1
    s = sel.pcrSelections[0]
    assert (s.hash, s.sizeofSelect, bytes(s.pcrSelect)) == (0x000B, 3, b"\x01\x20\x82\x00")
    with pytest.raises(ValueError):
        esys.pcr_selection([24])


def test_unmarshal_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        esys.unmarshal_public(b"\x00\x10abc")
    with pytest.raises(ValueError):
        esys.unmarshal_private(b"\x00\x02abcd")  # trailing bytes


# -- against swtpm --------------------------------------------------------------------------------


def test_pcr_read_matches_esapi_eight_per_command(swtpm: Swtpm, swtpm_proxy: CountingProxy) -> None:
    txt_launch(swtpm, sample_modules())
    with Tpm(swtpm.tcti) as tpm:
        expected = tpm.read_pcrs(range(24))
        expected_sha1 = tpm.read_pcrs([17, 18], bank="sha1")
    swtpm_proxy.reset()
    with Esys(swtpm_proxy.tcti) as tpm2:
        assert tpm2.pcr_read(range(24)) == expected
        assert swtpm_proxy.commands == ["PCR_Read"] * 3
        assert tpm2.read_pcrs([18, 17], bank="sha1") == expected_sha1
        assert list(tpm2.pcr_read([23, 0, 17])) == [0, 17, 23]


def test_pcr_extend_matches_the_spec(swtpm: Swtpm, swtpm_proxy: CountingProxy) -> None:
    digest = hashlib.sha256(b"header").digest()
    with Esys(swtpm_proxy.tcti) as tpm:
        before = tpm.pcr_read([13])[13]
        swtpm_proxy.reset()
        tpm.pcr_extend(13, digest)
        assert swtpm_proxy.commands == ["PCR_Extend"]
        tpm.extend_pcr(16, hashlib.sha1(b"x").digest(), bank="sha1")
        with pytest.raises(ValueError):
            tpm.pcr_extend(13, b"short")
    with Tpm(swtpm.tcti) as ref:
        assert ref.read_pcrs([13])[13] == hashlib.sha256(before + digest).digest()
        assert (
            ref.read_pcrs([16], bank="sha1")[16]
            == hashlib.sha1(bytes(20) + hashlib.sha1(b"x").digest()).digest()
        )


def test_measure_header_and_cap_take_either_connection(swtpm: Swtpm) -> None:
    digest = hashlib.sha256(b"luks header").digest()
    with Esys(swtpm.tcti) as tpm:
        chain.measure_header(tpm, digest)
        chain.measure_header(tpm, digest)  # a retry in the same boot: no second extend
        assert tpm.read_pcrs([13])[13] == chain.pcr13_after_extend(digest)
    with Tpm(swtpm.tcti) as ref:
        chain.cap(ref)
        capped = ref.read_pcrs([13])[13]
    with Esys(swtpm.tcti) as tpm:
        assert tpm.pcr_read([13])[13] == capped != chain.pcr13_after_extend(digest)


def test_srk_name_matches_esapi(swtpm: Swtpm, swtpm_proxy: CountingProxy) -> None:
    with Tpm(swtpm.tcti) as tpm:
        found = tpm.find_srk()
    if found is None:
        with Esys(swtpm.tcti) as e:
            assert e.srk_name() is None
        with Tpm(swtpm.tcti) as tpm:
            found = tpm.ensure_srk()
    swtpm_proxy.reset()
    with Esys(swtpm_proxy.tcti) as e:
        assert e.srk_name() == found.name
        assert swtpm_proxy.commands == ["GetCapability", "ReadPublic"]
        assert e.srk_name(0x81000123) is None


def test_unreachable_tpm_is_tpm_unavailable() -> None:
    with pytest.raises(TPMUnavailable):
        Esys("no-such-tcti-module:x")
    with pytest.raises(TPMUnavailable), Esys("swtpm:host=127.0.0.1,port=1") as tpm:
        tpm.pcr_read([17])


# -- no tpm2-pytss on the boot path ---------------------------------------------------------------


def _imported(stderr: str) -> set[str]:
    """Module names from ``python -X importtime``'s report."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def _forbidden(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))


def test_unseal_module_imports_no_tpm2_pytss() -> None:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c",
         "import qubes_seal.tpm.unseal, qubes_seal.tpm.esys as e; e.load()"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    modules = _imported(proc.stderr)
    assert "qubes_seal.tpm.unseal" in modules
    assert _forbidden(modules) == []


@pytest.fixture
def machine(swtpm: Swtpm, tmp_path: Path):  # type: ignore[no-untyped-def]
    m = new_machine(swtpm, tmp_path)
    proof = m.cli("attest", "setup", "--text", "blue heron")
    assert proof.code == 0, proof.err  # type: ignore[attr-defined]
    yield m
    shut_down(m)


def _traced_boot(m: Machine, **changes: str) -> tuple[int, str, set[str]]:
    """Machine.boot, with ``-X importtime`` on the boot's interpreter."""
    m.swtpm.reboot()
    txt_launch(m.swtpm, sample_modules(**changes))
    if m.console.exists():
        m.console.unlink()
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "qubes_seal.boot", "--config",
         str(m.config())],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    out = m.console.read_text() if m.console.exists() else ""
    return proc.returncode, out, _imported(proc.stderr)


def test_boot_success_path_imports_no_tpm2_pytss(machine: Machine) -> None:
    code, out, modules = _traced_boot(machine)
    assert code == 0, out
    assert "blue heron" in out
    assert "RESULT: unlocked with the TPM and passphrase" in out
    assert {"qubes_seal.tpm.esys", "qubes_seal.tpm.unseal", "qubes_seal.chain"} <= modules
    assert _forbidden(modules) == []
    with Esys(machine.swtpm.tcti) as tpm:  # PCR 13 capped by the boot, through ctypes
        assert tpm.pcr_read([13])[13] != bytes(32)


def test_boot_refused_path_diagnoses_without_tpm2_pytss(machine: Machine) -> None:
    code, out, modules = _traced_boot(machine, xen_version="evil")
    assert "measurements do not match: PCR 17 differs" in out, out
    assert "blue heron" not in out
    assert "RESULT: unlocked with the recovery key" in out, out
    assert code == 0, out
    assert "qubes_seal.tpm.unseal" in modules
    assert _forbidden(modules) == []
