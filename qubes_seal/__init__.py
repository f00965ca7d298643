"""qubes-seal: measured-boot (tboot / Intel TXT) and key management for Qubes-style Xen hosts.

Data flows one way through the package, as it does through a boot:

    measure -> policy -> tpm (seal / unseal) -> kdf -> luks -> keystore -> service

``qubes_seal.sim`` holds the swtpm harness that simulates a TXT launch, used by the tests,
the benchmarks and the demonstration.
"""

__version__ = "0.1.0"
