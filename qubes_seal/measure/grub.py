"""Reading a tboot boot entry from grub.cfg: which files, which module strings.

Debian's ``20_linux_xen_tboot`` (and Qubes AEM's entries) look like::

    menuentry 'Qubes, with Xen 4.17 and Linux 6.6 (tboot)' ... {
        multiboot2 /tboot.gz logging=serial,memory,vga
        module2 /xen-4.17.gz console=none dom0_mem=min:1024M
        module2 /vmlinuz-6.6 root=/dev/mapper/qubes_dom0-root ro
        module2 --nounzip /initramfs-6.6.img
        module2 /GM45_GS45_PM45_SINIT_51.BIN
    }

The module string tboot measures is the words after the path as GRUB re-quotes them
(:func:`~qubes_seal.measure.tboot.grub_module_string`); ``module`` (multiboot v1, AEM)
works the same way.  SINIT ACMs (and LCP data) are dropped by tboot before measuring.

``grub-snippets/20_qubes_seal_tboot`` writes such entries; tests/test_grub_snippets.py
proves that what is read back here is what a launch of those files measures.  A module
line that uses a GRUB variable (``$x`` unquoted or in double quotes) is refused: its value
exists only at boot.  A ``$`` in single quotes is a literal character.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from .predict import Component
from .tboot import grub_module_string, load_module_image

ACM_MODULE_TYPE_CHIPSET = 2  # Intel TXT ACM header: ModuleType (offset 0, 16-bit LE)
LCP_POLICY_DATA_MAGIC = b"Intel(R) TXT LCP_POLICY_DATA\x00"


def split_words(line: str) -> list[str]:
    """GRUB script words of one line: quotes and backslash escapes removed, ``#`` comments cut.

    Enough of GRUB's lexer for boot entries: single quotes keep everything, double quotes
    honour ``\\\\``, ``\\"``, ``\\$``; a backslash outside quotes escapes the next character.
    Variables (``$x``) are not expanded: :func:`lex_words` says which words hold one.
    """
    return [word for word, _ in lex_words(line)]


def lex_words(line: str) -> list[tuple[str, bool]]:
    """Like :func:`split_words`, with each word whether GRUB would expand a variable in it.

    A ``$`` unquoted or in double quotes starts a variable (its value is known only at
    boot); in single quotes or escaped by a backslash it is a literal character.
    """
    words: list[tuple[str, bool]] = []
    cur: list[str] = []
    in_word = False
    variable = False
    i = 0
    while i < len(line):
        c = line[i]
        if c in " \t":
            if in_word:
                words.append(("".join(cur), variable))
                cur, in_word, variable = [], False, False
        elif c == "#" and not in_word:
            break
        elif c == "'":
            end = line.find("'", i + 1)
            if end < 0:
                raise UsageError(f"unterminated quote in grub.cfg line: {line.strip()}")
            cur.append(line[i + 1 : end])
            in_word, i = True, end
        elif c == '"':
            i += 1
            while i < len(line) and line[i] != '"':
                if line[i] == "\\" and i + 1 < len(line) and line[i + 1] in '\\"$':
                    i += 1
                elif line[i] == "$":
                    variable = True
                cur.append(line[i])
                i += 1
            if i >= len(line):
                raise UsageError(f"unterminated quote in grub.cfg line: {line.strip()}")
            in_word = True
        elif c == "\\" and i + 1 < len(line):
            cur.append(line[i + 1])
            in_word, i = True, i + 1
        else:
            variable = variable or c == "$"
            cur.append(c)
            in_word = True
        i += 1
    if in_word:
        words.append(("".join(cur), variable))
    return words


@dataclass(frozen=True)
class ModuleLine:
    path: str
    args: list[str]
    nounzip: bool
    uses_variables: bool = False  # a $variable GRUB expands at boot, in the path or an arg


@dataclass(frozen=True)
class BootEntry:
    title: str
    kernel: str  # the multiboot kernel: tboot
    modules: list[ModuleLine]
    kernel_args: tuple[str, ...] = ()  # the words after tboot's path: its command line
    kernel_uses_variables: bool = False

    @property
    def kernel_cmdline(self) -> bytes:
        """tboot's command line as GRUB 2 passes it (without the file name, for
        ``multiboot`` and ``multiboot2`` alike) and as SINIT measures it in the MLE."""
        return grub_module_string(self.kernel_args)


def entries(text: str) -> list[BootEntry]:
    """Every ``menuentry`` of a grub.cfg with its multiboot kernel and module lines."""
    out: list[BootEntry] = []
    current: tuple[str, str, list[ModuleLine]] | None = None
    kernel_args: tuple[str, ...] = ()
    kernel_vars = False
    depth = 0
    for raw in text.splitlines():
        line = raw.strip()
        lexed = lex_words(line) if line else []
        words = [w for w, _ in lexed]
        if not words:
            continue
        if words[0] == "menuentry" and len(words) > 1:
            current, depth = (words[1], "", []), 1
            kernel_args, kernel_vars = (), False
            continue
        if current is None:
            continue
        if words[0] == "}":
            depth -= 1
            if depth == 0:
                out.append(BootEntry(current[0], current[1], current[2], kernel_args,
                                     kernel_vars))  # fmt: skip
                current = None
            continue
        if words[-1] == "{":
            depth += 1
        if words[0] in ("multiboot", "multiboot2") and len(words) > 1:
            current = (current[0], words[1], current[2])
            kernel_args, kernel_vars = tuple(words[2:]), any(v for _, v in lexed[1:])
        elif words[0] in ("module", "module2") and len(words) > 1:
            # grub_cmd_module: --nounzip only as the first argument, then the path.
            start = 2 if words[1] == "--nounzip" else 1
            if len(words) <= start:
                continue
            variables = any(v for _, v in lexed[start:])
            current[2].append(ModuleLine(words[start], words[start + 1 :], start == 2, variables))
    return out


def find_entry(text: str, title: str) -> BootEntry:
    found = [e for e in entries(text) if e.title == title]
    if not found:
        titles = "\n".join(f"  {e.title}" for e in entries(text) if e.kernel)
        raise UsageError(
            f"no boot entry titled {title!r} in the GRUB configuration",
            hint="Entries with a multiboot kernel:\n" + (titles or "  (none)"),
        )
    return found[0]


def is_dropped_by_tboot(image: bytes) -> bool:
    """SINIT/RACM ACMs and LCP policy data: tboot removes them before measuring modules."""
    if image.startswith(LCP_POLICY_DATA_MAGIC):
        return True
    return len(image) >= 4 and int.from_bytes(image[:2], "little") == ACM_MODULE_TYPE_CHIPSET


def resolve(path: str, boot_dir: Path) -> Path:
    """A GRUB path (relative to its root device) as a file here.

    GRUB's root is usually the /boot partition, so ``/xen.gz`` is ``/boot/xen.gz``; on a
    machine without a separate /boot the entry says ``/boot/xen.gz`` itself.
    """
    if "$" in path or path.startswith("("):
        raise UsageError(f"cannot resolve GRUB path {path!r}: give the files explicitly")
    rel = path.lstrip("/")
    candidates = [boot_dir / rel]
    if rel.startswith("boot/"):
        candidates.insert(0, boot_dir.parent / rel)
    # /boot inside a subvolume or another directory of GRUB's root (``/@/boot/xen.gz``,
    # as grub-mkrelpath writes it): the part after the last ``boot`` component.
    parts = rel.split("/")
    if "boot" in parts[:-1]:
        last = len(parts) - 1 - parts[::-1].index("boot")
        candidates.append(boot_dir.joinpath(*parts[last + 1 :]))
    if boot_dir.name in parts[:-1] and boot_dir.name != "boot":
        last = len(parts) - 1 - parts[::-1].index(boot_dir.name)
        candidates.append(boot_dir.joinpath(*parts[last + 1 :]))
    for c in candidates:
        if c.exists():
            return c
    raise UsageError(f"module {path!r} of the boot entry not found under {boot_dir}")


def components_from_entry(entry: BootEntry, *, boot_dir: Path) -> list[Component]:
    """The modules tboot will measure for ``entry``, read from ``boot_dir``."""
    comps: list[Component] = []
    names = iter(["xen", "kernel", "initramfs"])
    for m in entry.modules:
        if m.uses_variables:
            raise UsageError(
                f"module line {m.path} uses GRUB variables: its measured string cannot be "
                "known in advance; give the components explicitly"
            )
        image = load_module_image(resolve(m.path, boot_dir), nounzip=m.nounzip)
        if is_dropped_by_tboot(image):
            continue
        comps.append(Component(next(names, Path(m.path).name), grub_module_string(m.args), image))
    if not comps:
        raise UsageError(f"boot entry {entry.title!r} has no module tboot would measure")
    return comps
