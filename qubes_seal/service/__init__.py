"""The dom0 key service: per-domain disk keys to the storage domain that serves them.

::

    storage domain                         dom0
    ──────────────                         ────
    qubes-seal-storage-agent open work
      └─ qrexec-client-vm @adminvm qubes.SealGetDiskKey+work
                     │  qrexec policy (/etc/qubes/policy.d/50-qubes-seal.policy)
                     ▼
                   /etc/qubes-rpc/qubes.SealGetDiskKey   (QREXEC_REMOTE_DOMAIN, ..._ARGUMENT)
                     │  one JSON line over /run/qubes-seal/keyd.sock (SO_PEERCRED checked)
                     ▼
                   qubes-seal serve  (config.toml: who serves what; rate limits; journal)
                     │  keystore from the unlock's hand-over (kernel keyring)
                     ▼
      64 raw key bytes ◄── stdout ◄── qrexec ◄──┘
      └─ cryptsetup open --key-file=- --keyfile-size=64 VOLUME NAME

During a domain key rotation (``qubes-seal domain rotate``, until ``--commit``) the same
executable answers ``qubes.SealGetPreviousDiskKey+work`` with the previous key, and
``qubes-seal-storage-agent rekey work`` moves a LUKS volume from that key to the new one.

Modules: :mod:`.protocol` (wire format, limits, exit codes; stdlib only), :mod:`.config`
(``/etc/qubes-seal/config.toml``), :mod:`.ratelimit`, :mod:`.daemon` (the authorisation
logic and the socket server), :mod:`.client` (admin requests from the CLI), :mod:`.agent`
(the storage domain's side).  This ``__init__`` imports nothing so that the agent and the
client stay light; see docs/KEYSERVICE.md.
"""
