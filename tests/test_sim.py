"""The swtpm harness: process lifecycle, the simulated TXT launch, localities, the proxy.

These tests pin down facts the rest of the test suite builds on (TBOOT-TXT.md, "Simulating
a launch on swtpm"): a reboot puts PCR 17-22 back to all 0xFF, the launch sequence gives
PCR 17 = H(0 || H(data)) and zero PCR 18-22, PCR 17 refuses extends from locality 0, and a
new swtpm TCTI resets the locality to 0.
"""

from __future__ import annotations

import hashlib
import itertools
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tpm2_pytss import (
    ESAPI,
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_PT,
    TPM2_RC,
    TPM2_SE,
    TPM2B_SENSITIVE_CREATE,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMT_HA,
    TPMT_SYM_DEF,
    TPMU_HA,
    TSS2_Exception,
)

from qubes_seal.errors import TPMUnavailable
from qubes_seal.sim.proxy import CommandParser, CountingProxy, command_name
from qubes_seal.sim.swtpm import (
    HASH_DATA_CHUNK,
    Swtpm,
    configure_da,
    free_port_pair,
    leaked_handles,
)

pytest_plugins = ["pytester"]

needs_swtpm = pytest.mark.skipif(
    shutil.which("swtpm") is None, reason="the swtpm binary is not on PATH (Debian package: swtpm)"
)

ALL_FF = b"\xff" * 32
ZERO = b"\x00" * 32


def pcr_values(esapi: ESAPI, bank: str, pcrs: list[int]) -> dict[int, bytes]:
    """PCR values of one bank, read 8 at a time (TPM2_PCR_Read returns at most 8)."""
    values: dict[int, bytes] = {}
    for first in range(0, len(pcrs), 8):
        chunk = pcrs[first : first + 8]
        selection = TPML_PCR_SELECTION.parse(f"{bank}:{','.join(map(str, chunk))}")
        _counter, _selected, digests = esapi.pcr_read(selection)
        values.update(zip(chunk, (bytes(d) for d in digests), strict=True))
    return values


def extend(esapi: ESAPI, pcr: int) -> None:
    digests = TPML_DIGEST_VALUES(
        [TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=b"\x01" * 32))]
    )
    esapi.pcr_extend(ESYS_TR.parse(f"pcr{pcr}"), digests)


def extend_allowed(esapi: ESAPI, pcr: int) -> bool:
    """True if the TPM accepts the extend, False if it refuses it for the locality."""
    try:
        extend(esapi, pcr)
    except TSS2_Exception as exc:
        if exc.error == TPM2_RC.LOCALITY:
            return False
        raise
    return True


@pytest.fixture
def esapi(swtpm: Swtpm) -> Iterator[ESAPI]:
    with ESAPI(swtpm.tcti) as ctx:
        yield ctx


# -- process lifecycle ------------------------------------------------------------------------


def test_free_port_pair_gives_two_bindable_ports() -> None:
    port = free_port_pair()
    for p in (port, port + 1):
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


@needs_swtpm
@pytest.mark.swtpm
def test_start_and_stop(tmp_path: Path) -> None:
    tpm = Swtpm(tmp_path / "tpm")
    assert tpm.tcti == f"swtpm:host=127.0.0.1,port={tpm.port}"
    assert tpm.ctrl_port == tpm.port + 1
    with tpm:
        assert tpm.running and tpm.pid is not None
        assert (tmp_path / "tpm" / "tpm2-00.permall").exists()
        with ESAPI(tpm.tcti) as ctx:
            assert len(ctx.get_random(8)) == 8
    assert not tpm.running and tpm.pid is None
    tpm.stop()  # a second stop is a no-op
    with socket.socket() as s:  # the ports are released
        s.bind(("127.0.0.1", tpm.port))
    assert "swtpm socket --tpm2" in tpm.log_path.read_text()


@needs_swtpm
@pytest.mark.swtpm
def test_start_failure_carries_swtpm_stderr(tmp_path: Path) -> None:
    port = free_port_pair()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        tpm = Swtpm(tmp_path / "tpm", port=port)
        with pytest.raises(TPMUnavailable, match="Address already in use"):
            tpm.start()
        assert not tpm.running


@needs_swtpm
@pytest.mark.swtpm
def test_restart_waits_for_its_ports_held_a_moment(tmp_path: Path) -> None:
    """Power back on after a cut (crash tests): the ports the clients know are kept, and a
    port another process holds for a moment (a test beside this one probing for free
    ports) is waited for, not a failure."""
    tpm = Swtpm(tmp_path / "tpm")
    tpm.start()
    port = tpm.port
    tpm.kill()
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", port))
    squatter.listen()
    release = threading.Timer(0.3, squatter.close)
    release.start()
    try:
        tpm.start()
        assert tpm.running and tpm.port == port
        assert "Address already in use" in tpm.log_path.read_text()  # it did meet the squatter
    finally:
        release.cancel()
        squatter.close()
        tpm.stop()


def test_missing_binary_is_tpm_unavailable(tmp_path: Path) -> None:
    with pytest.raises(TPMUnavailable, match="not found"):
        Swtpm(tmp_path, binary="no-such-swtpm-binary").start()


@pytest.mark.swtpm
def test_kill_then_start_again(swtpm: Swtpm) -> None:
    swtpm.kill()
    assert not swtpm.running
    swtpm.start()
    with ESAPI(swtpm.tcti) as ctx:
        assert pcr_values(ctx, "sha256", [17]) == {17: ALL_FF}


# -- the simulated launch ---------------------------------------------------------------------


@pytest.mark.swtpm
def test_fresh_tpm_shows_no_launch(esapi: ESAPI) -> None:
    values = pcr_values(esapi, "sha256", list(range(24)))
    assert all(values[pcr] == ALL_FF for pcr in range(17, 23))
    assert all(values[pcr] == ZERO for pcr in [*range(17), 23])


@pytest.mark.swtpm
@pytest.mark.parametrize(
    "size", [0, 3, HASH_DATA_CHUNK - 1, HASH_DATA_CHUNK, HASH_DATA_CHUNK + 1, 100_000]
)
def test_hash_start_extends_pcr17_from_zero(swtpm: Swtpm, esapi: ESAPI, size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    swtpm.hash_start(data)
    sha256 = pcr_values(esapi, "sha256", list(range(17, 23)))
    assert sha256[17] == hashlib.sha256(ZERO + hashlib.sha256(data).digest()).digest()
    assert all(sha256[pcr] == ZERO for pcr in range(18, 23))
    sha1 = pcr_values(esapi, "sha1", [17])  # every active bank, each with its own hash
    assert sha1[17] == hashlib.sha1(b"\0" * 20 + hashlib.sha1(data).digest()).digest()


@pytest.mark.swtpm
@pytest.mark.skipif(shutil.which("swtpm_ioctl") is None, reason="swtpm_ioctl not on PATH")
def test_hash_start_agrees_with_swtpm_ioctl(swtpm: Swtpm, esapi: ESAPI) -> None:
    data = bytes(range(256)) * 40
    swtpm.hash_start(data)
    ours = pcr_values(esapi, "sha256", list(range(16, 24)))
    subprocess.run(
        ["swtpm_ioctl", "--tcp", f"127.0.0.1:{swtpm.ctrl_port}", "-h", "-"],
        input=data,
        check=True,
    )
    assert pcr_values(esapi, "sha256", list(range(16, 24))) == ours


@pytest.mark.swtpm
def test_reboot_resets_drtm_pcrs(swtpm: Swtpm) -> None:
    swtpm.hash_start(b"SINIT")
    with ESAPI(swtpm.tcti) as ctx:
        assert pcr_values(ctx, "sha256", [17])[17] not in (ALL_FF, ZERO)
    swtpm.reboot()
    with ESAPI(swtpm.tcti) as ctx:
        assert pcr_values(ctx, "sha256", list(range(17, 23))) == dict.fromkeys(
            range(17, 23), ALL_FF
        )


# -- localities -------------------------------------------------------------------------------


@pytest.mark.swtpm
def test_pcr17_extends_at_locality_2_not_0(swtpm: Swtpm, esapi: ESAPI) -> None:
    swtpm.hash_start(b"launch")
    assert not extend_allowed(esapi, 17)
    with swtpm.at_locality(2):
        assert extend_allowed(esapi, 17)
    assert not extend_allowed(esapi, 17)  # back at locality 0


@pytest.mark.swtpm
def test_new_swtpm_tcti_resets_locality_to_0(swtpm: Swtpm) -> None:
    swtpm.set_locality(2)
    with ESAPI(swtpm.tcti) as ctx:  # Tss2_Tcti_Swtpm_Init sends CMD_SET_LOCALITY 0
        assert not extend_allowed(ctx, 17)


@pytest.mark.swtpm
def test_locality_outlives_connections_and_launch(swtpm: Swtpm, esapi: ESAPI) -> None:
    with swtpm.at_locality(2):
        swtpm.hash_start(b"launch")  # does not change the locality
        for _ in range(3):  # the TCTI opens a new connection for every command
            assert extend_allowed(esapi, 17)


# E = TPM2_PCR_Extend accepted, . = TPM_RC_LOCALITY; columns are PCR 16..23 (libtpms 0.9).
LOCALITY_TABLE = {
    0: "E......E",
    1: "E...E..E",
    2: "EEEEEEEE",
    3: "EEEEE..E",
    4: "EEE....E",
}


@pytest.mark.swtpm
def test_pcr_extend_localities_match_documented_table(swtpm: Swtpm, esapi: ESAPI) -> None:
    seen = {}
    for locality in LOCALITY_TABLE:
        with swtpm.at_locality(locality):
            seen[locality] = "".join(
                "E" if extend_allowed(esapi, pcr) else "." for pcr in range(16, 24)
            )
    assert seen == LOCALITY_TABLE


# -- dictionary-attack parameters -------------------------------------------------------------


@pytest.mark.swtpm
def test_configure_da(swtpm: Swtpm) -> None:
    configure_da(swtpm.tcti, max_tries=32, recovery_time=1, lockout_recovery=2)
    with ESAPI(swtpm.tcti) as ctx:
        _more, data = ctx.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.MAX_AUTH_FAIL, 3)
        props = {int(p.property): int(p.value) for p in data.data.tpmProperties}
    assert props[TPM2_PT.MAX_AUTH_FAIL] == 32
    assert props[TPM2_PT.LOCKOUT_INTERVAL] == 1
    assert props[TPM2_PT.LOCKOUT_RECOVERY] == 2


# -- handle leaks -----------------------------------------------------------------------------


@pytest.mark.swtpm
def test_leaked_handles_finds_objects_and_sessions(swtpm: Swtpm, esapi: ESAPI) -> None:
    assert leaked_handles(swtpm.tcti) == []
    primary = esapi.create_primary(TPM2B_SENSITIVE_CREATE(), "ecc256")[0]
    session = esapi.start_auth_session(
        ESYS_TR.NONE,
        ESYS_TR.NONE,
        TPM2_SE.POLICY,
        TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
        TPM2_ALG.SHA256,
    )
    try:
        leaks = leaked_handles(swtpm.tcti)
        assert leaks == [
            "transient object 0x80000000",
            "loaded session 0x03000000 (policy session)",
        ]
    finally:
        esapi.flush_context(primary)
        esapi.flush_context(session)
    assert leaked_handles(swtpm.tcti) == []


LEAKING_TEST = """
from tpm2_pytss import ESAPI, TPM2B_SENSITIVE_CREATE

def test_leaks(swtpm):
    esapi = ESAPI(swtpm.tcti)
    esapi.create_primary(TPM2B_SENSITIVE_CREATE(), "ecc256")
    esapi.close()  # closing the ESAPI does not flush what the TPM holds
"""


@needs_swtpm
@pytest.mark.swtpm
def test_swtpm_fixture_fails_the_test_that_leaks(pytester: pytest.Pytester) -> None:
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_leaky=LEAKING_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*left TPM handles loaded: transient object 0x80000000*"])


# -- the counting proxy -----------------------------------------------------------------------


@pytest.mark.swtpm
def test_proxy_records_a_known_command_sequence(swtpm_proxy: CountingProxy) -> None:
    with ESAPI(swtpm_proxy.tcti) as ctx:
        swtpm_proxy.reset()
        pcr_values(ctx, "sha256", [17])
        ctx.get_random(8)
        primary = ctx.create_primary(TPM2B_SENSITIVE_CREATE(), "ecc256")[0]
        ctx.flush_context(primary)
    assert swtpm_proxy.commands == ["PCR_Read", "GetRandom", "CreatePrimary", "FlushContext"]
    swtpm_proxy.reset()
    assert swtpm_proxy.commands == []


@pytest.mark.swtpm
def test_proxy_forwards_the_control_channel(swtpm: Swtpm, swtpm_proxy: CountingProxy) -> None:
    with ESAPI(swtpm_proxy.tcti) as ctx:
        ctx.tcti.set_locality(2)  # CMD_SET_LOCALITY through the proxy's P' + 1
        try:
            extend(ctx, 17)
        finally:
            ctx.tcti.set_locality(0)
    assert swtpm_proxy.commands[-1] == "PCR_Extend"


def test_proxy_stops_cleanly_without_upstream() -> None:
    port = free_port_pair()  # nothing listens there
    with CountingProxy(port) as proxy:
        # The proxy accepts, fails to reach swtpm and closes the client.  libtss2 3.2.1's
        # swtpm TCTI does not notice on its control channel at initialisation (a signed /
        # unsigned comparison of read()'s -1), so the first TPM command is what fails.
        with pytest.raises(TSS2_Exception), ESAPI(proxy.tcti) as ctx:
            ctx.get_random(8)
        assert proxy.commands == []


def _command(code: int, body: bytes) -> bytes:
    return struct.pack(">HII", 0x8001, 10 + len(body), code) + body


@given(
    commands=st.lists(st.tuples(st.integers(0x11F, 0x19A), st.binary(max_size=40)), max_size=8),
    cuts=st.lists(st.integers(0, 400), max_size=12),
)
def test_command_parser_survives_any_tcp_split(
    commands: list[tuple[int, bytes]], cuts: list[int]
) -> None:
    stream = b"".join(_command(code, body) for code, body in commands)
    points = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    parser = CommandParser()
    seen = []
    for start, end in itertools.pairwise(points):
        seen.extend(parser.feed(stream[start:end]))
    assert seen == [code for code, _body in commands]
    assert not parser.malformed


def test_command_parser_stops_at_a_malformed_size() -> None:
    parser = CommandParser()
    bad = struct.pack(">HII", 0x8001, 4, 0x17B)
    assert parser.feed(bad + _command(0x17E, b"")) == [0x17B]
    assert parser.malformed
    assert parser.feed(_command(0x17E, b"")) == []


def test_command_names() -> None:
    assert command_name(0x15E) == "Unseal"
    assert command_name(0x17F) == "PolicyPCR"
    assert command_name(0x12345678) == "0x12345678"
