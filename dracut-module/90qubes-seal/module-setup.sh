#!/bin/bash
# dracut module: qubes-seal early-boot unlock (see docs/BOOT.md).
#
# Installs a Python interpreter and exactly the Python modules that
# `python3 -m qubes_seal.boot` can import (computed by qubes-seal-modules.py, never listed
# by hand), their native libraries, cryptsetup and libcryptsetup, the TCTI libraries that
# libtss2 loads at run time, /etc/qubes-seal/boot.toml and qubes-seal-unlock.service, which
# runs before cryptsetup-pre.target.
#
# Build-time settings (environment):
#   QUBES_SEAL_PYTHON       the interpreter whose site-packages hold qubes_seal
#                           (default /usr/bin/python3; a virtual environment's python works)
#   QUBES_SEAL_BOOT_CONFIG  the boot.toml to install (default /etc/qubes-seal/boot.toml)
#   QUBES_SEAL_PY_SOURCES   "yes": the .py sources next to the compiled files (tracebacks
#                           with source lines, about 3.6 MiB more); default "no": sourceless
#                           .pyc files only

_qs_python() {
    echo "${QUBES_SEAL_PYTHON:-/usr/bin/python3}"
}

_qs_config() {
    echo "${QUBES_SEAL_BOOT_CONFIG:-/etc/qubes-seal/boot.toml}"
}

# Prerequisite check(s) for module.
check() {
    local _py
    _py=$(_qs_python)
    require_binaries "$_py" cryptsetup systemd-ask-password || return 1
    if ! "$_py" -c 'import qubes_seal.boot.sequence' > /dev/null 2>&1; then
        dinfo "dracut module 'qubes-seal' will not be installed, because qubes_seal is not importable by $_py (set QUBES_SEAL_PYTHON)"
        return 1
    fi
    # Configured on this host: include it by default; otherwise only on request (-m, add_dracutmodules).
    [[ -f $(_qs_config) ]] && return 0
    return 255
}

# Module dependency requirements.
depends() {
    echo systemd systemd-ask-password crypt
    return 0
}

# Install kernel module(s): the TPM drivers (TIS and CRB) and dm-crypt.
installkernel() {
    hostonly='' instmods tpm_tis tpm_crb dm_crypt
}

# Install the required file(s) for the module in the initramfs.
install() {
    local _py _tmp _kind _src _dst _config
    local -a _native=()
    _py=$(_qs_python)
    _tmp=$(mktemp -d "${DRACUT_TMPDIR:-${TMPDIR:-/var/tmp}}/qubes-seal.XXXXXX") || return 1

    local -a _opts=(--pyc-dir "$_tmp/pyc")
    [[ ${QUBES_SEAL_PY_SOURCES:-no} == yes ]] || _opts+=(--no-sources)
    if ! "$_py" "$moddir/qubes-seal-modules.py" "${_opts[@]}" > "$_tmp/manifest"; then
        derror "qubes-seal: cannot compute the Python modules of the boot path with $_py"
        rm -rf -- "$_tmp"
        return 1
    fi

    # The interpreter (a venv's python resolved to the real one) as /usr/bin/python3, its
    # libraries resolved by dracut-install; the modules under /usr/lib/pythonX.Y, the
    # standard-library directory of /usr/bin/python3, so no site-packages, .pth file or
    # PYTHONPATH is needed (see docs/BOOT.md).
    while IFS=$'\t' read -r _kind _src _dst; do
        case $_kind in
            interpreter) inst_binary "$_src" /usr/bin/python3 || return 1 ;;
            dir) inst_dir "$_dst" ;;
            file) inst_simple "$_src" "$_dst" || return 1 ;;
            native)
                inst_library "$_src" "$_dst" || return 1
                _native+=("$initdir$_dst")
                ;;
            library) inst_library "$_src" || return 1 ;;
        esac
    done < "$_tmp/manifest"
    rm -rf -- "$_tmp"

    # dracut strips debugging information only (strip -g); the symbol tables of the
    # extension modules and of libpython are not needed either (their dynamic symbols stay).
    if [[ $do_strip == yes ]] && ! [[ $DRACUT_FIPS_MODE ]] && command -v strip > /dev/null; then
        local _libpython
        _libpython=$(ldd "$initdir/usr/bin/python3" 2> /dev/null | sed -n 's/^[[:space:]]*libpython[^ ]* => \([^ ]*\).*/\1/p')
        [[ -n $_libpython && -f $initdir$_libpython ]] && _native+=("$initdir$_libpython")
        strip --strip-unneeded "${_native[@]}" 2> /dev/null
    fi

    # Libraries that Python code opens with ctypes when it runs (invisible to ldd and to the
    # import-time scan of qubes-seal-modules.py): libcryptsetup (qubes_seal.luks) and libudev
    # (pyudev, found by ctypes.util.find_library, which runs /sbin/ldconfig -p).
    inst_libdir_file "libcryptsetup.so.*" "libudev.so.*"
    inst_multiple ldconfig
    # cryptsetup; mount for the ramfs of the runtime key file; dmsetup for a diagnosis.
    inst_multiple cryptsetup systemd-ask-password
    inst_multiple -o mount dmsetup
    # The graphical boot (docs/BOOT.md): when dracut's plymouth module is in the image, the
    # boot's messages and prompts go to the splash through plymouth's client (50plymouth
    # installs it already; named here so that the boot path's needs are listed in one place).
    # Never a dependency: without plymouth the console is used, as before.
    if dracut_module_included "plymouth"; then
        inst_multiple -o plymouth
    fi

    # The boot path reaches the TPM through ctypes (qubes_seal/tpm/esys.py): libtss2's ESYS,
    # MU and TCTI loader (and libtss2-sys under ESYS) are dlopen()ed, so name them; the TCTI
    # loader in turn dlopen()s the TCTI at run time: the kernel device, and swtpm for the
    # tests (a few kB).  libcrypto (OpenSSL) comes with cryptsetup.
    inst_libdir_file "libtss2-esys.so.0*" "libtss2-mu.so.0*" "libtss2-tctildr.so.0*" \
        "libtss2-sys.so.1*" "libtss2-tcti-device.so*" "libtss2-tcti-swtpm.so*" "libcrypto.so.3*"

    _config=$(_qs_config)
    inst_dir /etc/qubes-seal
    [[ -f $_config ]] && inst_simple "$_config" /etc/qubes-seal/boot.toml

    inst_simple "$moddir/qubes-seal-unlock.service" "$systemdsystemunitdir/qubes-seal-unlock.service"
    $SYSTEMCTL -q --root "$initdir" add-wants initrd.target qubes-seal-unlock.service
}
