"""The container section of ``qubes-seal status``: policy, accepted states, rollback counter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import QubesSealError


def summary(
    path: Path, tpm: Any, *, txt_log: str | None = None
) -> tuple[dict[str, Any], list[str]]:
    """What the token of the container at ``path`` accepts, read without any secret.

    ``tpm`` is an open :class:`~qubes_seal.tpm.device.Tpm`.  Errors (no container, no token,
    an unreadable counter) become an ``error`` entry and a line: ``status`` never fails on
    them.
    """
    from .. import chain
    from ..luks.container import Container

    try:
        container = Container(path)
        token_id, token = chain.read_token(container)
    except QubesSealError as exc:
        return {"path": str(path), "error": exc.message}, [f"container:       {exc.message}"]
    sealed = token.sealed
    doc: dict[str, Any] = {
        "path": str(path),
        "uuid": container.uuid,
        "token_id": token_id,
        "keyslots": {"tpm": token.tpm_keyslot, "recovery": token.recovery_keyslot},
        "pcrs": sealed.pcrs,
        "states": [s.label for s in sealed.pcr_states],
        "signed": None,
        "counter": None,
        "proof": None,
    }
    lines = [
        f"container:       {path} (UUID {container.uuid})",
        f"  keyslots:      TPM+passphrase {token.tpm_keyslot}, recovery {token.recovery_keyslot}",
    ]
    doc["token_authentic"], text = _authenticity(path, token, container.uuid)
    lines.append(f"  token:         {text}")
    if sealed.signed is not None:
        doc["signed"] = {
            "signer_name": sealed.signed.name.hex(),
            "policy_ref": sealed.signed.policy_ref.hex(),
        }
        lines.append(
            f"  policy:        signed (PolicyAuthorize by the dom0 key "
            f"{sealed.signed.name.hex()[:20]}..., PolicyNV, PolicyAuthValue)"
        )
    else:
        lines.append(
            "  policy:        PCR values in the sealed object (before signed policies; "
            "'qubes-seal reseal' moves it to signed policies)"
        )
    drtm = [p for p in sealed.pcrs if p != chain.PCR13]
    current = tpm.read_pcrs(drtm, bank=sealed.pcr_bank) if drtm else {}
    matching = [s.label for s in sealed.pcr_states if all(s.values[p] == current[p] for p in drtm)]
    doc["matching_states"] = matching
    lines.append(
        f"  boot states:   {len(sealed.pcr_states)} accepted ("
        + ", ".join(s.label for s in sealed.pcr_states)
        + "); PCR "
        + ",".join(map(str, drtm))
        + " of this boot: "
        + (f"match '{matching[0]}'" if matching else "match NONE (the next unlock is refused)")
    )
    doc["explanation"] = None
    if not matching and sealed.pcr_states:
        from ..measure.explain import describe_refusal
        from .refusal import cmdline_file

        why = describe_refusal(
            sealed, current, txt_log=txt_log or "/run/qubes-seal/txt-event.log",
            cmdline_file=cmdline_file(),
        )  # fmt: skip
        doc["explanation"] = why.to_json()
        lines += ["    " + line for line in why.lines()]
    if sealed.nv is not None:
        try:
            value: int | None = tpm.nv_read_counter(sealed.nv)
        except QubesSealError as exc:
            value, problem = None, exc.message
        bound = sealed.nv.bound
        if value is None:
            verdict = f"UNREADABLE ({problem})"
        elif value == bound:
            verdict = "settled: every older token and signature is revoked"
        elif value < bound:
            verdict = (
                f"increment pending: older tokens still accepted; run 'qubes-seal repair "
                f"--container {path}'"
            )
        else:
            verdict = (
                "REVOKED: the counter passed this token's bound (a newer token was written, "
                "or this container was rolled back); unlock with the recovery key"
            )
        doc["counter"] = {
            "handle": f"0x{sealed.nv.handle:08x}",
            "value": value,
            "bound": bound,
            "revoked": value is not None and value > bound,
        }
        lines.append(
            f"  rollback:      NV counter 0x{sealed.nv.handle:08x} = {value}, token bound "
            f"{bound}: {verdict}"
        )
    else:
        lines.append("  rollback:      no NV counter ('qubes-seal recover --reseal' adds one)")
    if token.proof is not None:
        signed = token.proof.sealed.signed is not None
        doc["proof"] = {"kind": token.proof.kind, "signed": signed}
        lines.append(
            f"  proof:         {token.proof.kind}" + (" (signed policy)" if signed else "")
        )
    else:
        lines.append("  proof:         none ('qubes-seal attest setup')")
    return doc, lines


def _authenticity(path: Path, token: Any, uuid: str) -> tuple[bool | None, str]:
    """Whether the token's MAC verifies, through this boot's hand-over (None: no hand-over,
    so it cannot be checked now).  What follows in ``status`` is shown either way, and
    trusted only when this says authenticated."""
    from .. import handover
    from ..errors import QubesSealError
    from ..token import TokenNotAuthentic, mac_key

    try:
        vk = handover.get(uuid)
    except QubesSealError:
        vk = None
    if vk is None:
        return None, "not checked (no hand-over in this boot: 'qubes-seal unlock' checks it)"
    try:
        with vk, mac_key(vk) as key:
            token.authenticate(key, uuid, source=f"{path}'s token")
    except TokenNotAuthentic:
        return False, (
            "NOT AUTHENTIC: rewritten outside qubes-seal; nothing below can be trusted "
            "('qubes-seal recover --reseal')"
        )
    return True, "authenticated (its MAC verifies under this container's key)"
